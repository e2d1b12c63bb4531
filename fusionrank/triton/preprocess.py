"""The `preprocess` model (the reference ensemble's first step): its Python-backend class and its config."""

from __future__ import annotations

import json
from collections.abc import Mapping

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.names import PREPROCESS, encoder_name
from fusionrank.contract.spec import Modality, PipelineSpec, from_dict
from fusionrank.contract.tensors import ITEM_INPUT, ITEM_VIDEO
from fusionrank.request.validation import RequestPreprocessor
from fusionrank.triton._batched import BatchedModel
from fusionrank.triton._config import Configs, TritonUnit, every_profile, python_config, spec_parameter


class PreprocessModel(BatchedModel):
    per_request = True  # its outputs hold one row per encoder row of each modality, not one per candidate

    """preprocess: one request's raw payloads and history -> every encoder's input tensors and the checked history.

    Every input of a request is validated here, in the ensemble's first step, so a bad request fails before any
    other step of it runs (see `fusionrank.contract.spec.member_models`)."""

    def setup(self):
        self.spec = from_dict(json.loads(self.params["spec"]))
        self.preprocess = RequestPreprocessor(self.spec, tokenizer_dir=self.version_dir / "tokenizer")

    def prepare(self, inputs):
        # Per request (text is padded to the request's own bucket), so it runs here, not in run().
        prepared = self.preprocess(inputs, placeholders=True)
        for m, owners in prepared.owners.items():
            # The ensemble sends a modality's rows to its encoder in one call: a request with more (its videos'
            # frames) than the encoder's batch is refused here, not by Triton after the preprocessing.
            limit = self.spec.serving.batching(encoder_name(m)).max_batch_size
            if len(owners) > limit:
                raise PreprocessError(ITEM_VIDEO if m is Modality.IMAGE else ITEM_INPUT[m],
                                      f"the request needs {len(owners)} {m.value} encoder rows (stills and "
                                      f"{self.spec.modalities.video.frames} frames per video) and the reference "
                                      f"ensemble sends at most {limit} in one call; send fewer videos per request "
                                      f"or use the route ({self.spec.serving.route})")
        return prepared.flat()


def configs(spec: PipelineSpec, model: str, rendered: Mapping[str, Configs]) -> Configs:
    """The same Python model on the CPU in every profile, with the spec slice it validates requests against."""
    config = python_config(spec, model, "preprocess")
    config.parameters["spec"].string_value = spec_parameter(spec)
    return every_profile(config)


UNIT = TritonUnit(lambda spec: (PREPROCESS,), configs, __name__, PreprocessModel.__name__)
