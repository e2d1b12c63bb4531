"""Request sets for load on the served route: streams of never-seen (cold) requests, floods of large PNGs, and the
factories of cached requests, all from `fusionrank.request.scenario.RequestFactory`. PIL and the fusionrank request
modules are imported where they are used, keeping them off the import of `benchmarks.lib`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fusionrank.request.scenario import png_with_nonce


def big_png(side: int) -> bytes:
    """A compressible side x side RGB PNG (a gradient): every pixel must be decoded, the payload stays small."""
    import io

    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side))],
                      axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


@dataclass
class RequestSets:
    """The request streams of one run: cold (never-seen items), flood (large PNGs) and cached requests, drawn
    from the benchmark catalogue `bench` for `spec` by `fusionrank.request.scenario.RequestFactory`."""

    spec: object
    bench: object
    candidates: int
    seed: int

    def factory(self, index: int, novel: bool):
        """The request factory of stream `index`: never-seen items (`novel`) or the catalogue's own. A never-seen
        item is a catalogue item with new bytes (`RequestFactory(renew_novel=True)`, as every benchmark's load
        generator makes them): the callers, which share the machine with the server, spend little CPU on making
        requests while the server decodes and encodes every such candidate as new."""
        from fusionrank.request.scenario import RequestFactory, Scenario

        scenario = Scenario(name="traffic", candidates={self.candidates: 1.0}, novel_share=1.0 if novel else 0.0,
                            zipf_exponent=1.1, source="fusionrank bench traffic")
        return RequestFactory(self.spec, self.bench, scenario, seed=self.seed * 10_000 + index, renew_novel=True)

    def cold(self, count: int, phase: int) -> list[Callable[[], dict]]:
        """`count` independent streams of never-seen items (one factory each, seeded by `phase` and stream, so no
        two streams or phases < 100 apart ever send the same bytes); each stream may be called from several
        threads (an open loop's workers)."""
        def stream(index: int) -> Callable[[], dict]:
            factory, lock = self.factory(phase * 100 + index, novel=True), threading.Lock()

            def make() -> dict:
                with lock:
                    return factory.next().arrays()

            return make

        return [stream(i) for i in range(count)]

    def flood(self, count: int, per_request: int, side: int) -> list[Callable[[], dict]]:
        """`count` streams of requests of `per_request` distinct side x side PNGs (never the same twice)."""
        from fusionrank.contract.spec import Modality
        from fusionrank.contract.tensors import request_arrays

        png, counter, lock = big_png(side), [0], threading.Lock()
        base = self.factory(999, novel=False).next()

        def make() -> dict:
            with lock:
                counter[0] += per_request
                first = counter[0]
            items = {m: list(base.items[m][:per_request]) for m in base.items}
            items[Modality.IMAGE] = [png_with_nonce(png, first + i) for i in range(per_request)]
            return request_arrays(items, base.history[:per_request])

        return [make] * count
