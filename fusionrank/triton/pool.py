"""The `pool_embeddings` model (the reference ensemble's step after the encoders): its class and its config."""

from __future__ import annotations

from collections.abc import Mapping

from fusionrank.contract.names import POOL_MODEL
from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.contract.tensors import MODALITY_MASK, embedding_name, model_io, owner_name, rows_name
from fusionrank.request.candidates import pool_rows
from fusionrank.triton._batched import BatchedModel
from fusionrank.triton._config import Configs, TritonUnit, every_profile, tensor


class PoolModel(BatchedModel):
    """pool_embeddings (the reference ensemble's step after the encoders): each encoder's rows -> one embedding per
    candidate in candidate order (a video's frames and still mean-pooled, zeros where absent; placeholder rows,
    owner -1, dropped). The same `pool_rows` as the route and the PyTorch reference."""

    per_request = True  # no batching: inputs hold the encoded rows, outputs one row per candidate

    def setup(self):
        self.modalities = [m for m in Modality if embedding_name(m) in self.output_names]

    def prepare(self, inputs):
        rows = len(inputs[MODALITY_MASK])
        out = {}
        for m in self.modalities:
            values, owners = inputs[rows_name(m)], inputs[owner_name(m)].reshape(-1)
            keep = owners >= 0
            out[embedding_name(m)] = pool_rows(values[keep], owners[keep], rows)
        return out


def configs(spec: PipelineSpec, model: str, rendered: Mapping[str, Configs]) -> Configs:
    """No batching (its inputs hold the encoded rows, its outputs one row per candidate), full shapes, one instance
    (a scatter-add per modality); the same in every profile."""
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    io_ = model_io(spec, model)
    config = mc.ModelConfig(name=model, max_batch_size=0, backend="python")
    config.input.extend(tensor(t, mc.ModelInput) for t in io_.inputs)
    config.output.extend(tensor(t, mc.ModelOutput) for t in io_.outputs)
    config.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    config.parameters["role"].string_value = "pool"
    return every_profile(config)


UNIT = TritonUnit(lambda spec: (POOL_MODEL,), configs, __name__, PoolModel.__name__)
