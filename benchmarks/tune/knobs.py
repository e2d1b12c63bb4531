"""The knobs `fusionrank tune` searches for a spec and a machine, in order of their expected effect."""

from __future__ import annotations

import os

from benchmarks.tune.search import Knob
from fusionrank.contract.spec import Modality, PipelineSpec


def default_knobs(spec: PipelineSpec, cores: int | None = None) -> list[Knob]:
    """Route instances and their gates' slots, each encoder's concurrent batches (threads on one session: little
    memory), instances (a process each) and ONNX Runtime intra-op threads, the encoders' and the ranker's queue
    delays, the encoders' largest batch, the route's queue delay, each encoder's memory arena (CPU for memory: it
    paid for the INT8 text encoder only, docs/capacity.md); bounded by the machine's cores."""
    cores = cores or os.cpu_count() or 1
    encoders = tuple(f"{m.value}_encoder" for m in spec.modalities.enabled)
    route = spec.serving.route
    up_to = tuple(range(1, max(2, cores) + 1))
    knobs = [Knob("route.instances", (route,), "instances", tuple(range(1, 2 * max(2, cores) + 1))),
             # Requests with payloads to decode each route instance serves at once (its gate's slots).
             Knob("route.max_decoding_requests", (), "max_decoding_requests", (1, 2, 3, 4))]
    # The image encoder does most of the work per candidate: it gets its own instances and threads.
    heavy = f"{Modality.IMAGE.value}_encoder"
    if heavy in encoders:
        knobs += [Knob(f"{heavy}.concurrent_batches", (heavy,), "concurrent_batches", up_to),
                  Knob(f"{heavy}.instances", (heavy,), "instances", up_to),
                  Knob(f"{heavy}.intra_op_threads", (heavy,), "intra_op_threads", up_to)]
    light = tuple(e for e in encoders if e != heavy)
    if light:
        knobs += [Knob("other_encoders.concurrent_batches", light, "concurrent_batches", up_to),
                  Knob("other_encoders.instances", light, "instances", up_to),
                  Knob("other_encoders.intra_op_threads", light, "intra_op_threads", up_to)]
    knobs += [Knob("encoders.max_queue_delay_us", encoders, "max_queue_delay_us", (0, 1000, 2000, 5000, 10000, 20000)),
              Knob("fusion_ranker.max_queue_delay_us", ("fusion_ranker",), "max_queue_delay_us",
                   (0, 1000, 2000, 5000, 10000)),
              # A ranking request is one batch: no member may take fewer rows than `serving.max_candidates`.
              Knob("encoders.max_batch_size", encoders, "max_batch_size",
                   tuple(b for b in (16, 32, 64, 128, 256) if b >= spec.serving.max_candidates)),
              Knob("route.max_queue_delay_us", (route,), "max_queue_delay_us", (0, 1000, 5000))]
    knobs += [Knob(f"{e}.memory_arena", (e,), "memory_arena", (0, 1)) for e in encoders]
    return knobs
