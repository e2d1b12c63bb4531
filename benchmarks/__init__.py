"""Benchmarks: one module per benchmark, each with `add_cli_args(parser)` and `main(args)`, reached as
`fusionrank bench <name>`; the other modules are the pieces they share (latency runners, server metrics, the
serving phases, the CPU variants). Heavy libraries (torch, ONNX Runtime's tools) are imported where a benchmark
runs, so listing them stays light."""

# name -> one line of help; the module is `benchmarks.<name>`.
BENCHMARKS = {
    "serve": "in-process pipeline and roof, plain ensemble, route on never-seen items and warm route on a Zipf "
             "candidate stream, side by side: table, bench.json, bench.png",
    "routes": "the cached route against the plain Triton ensemble on the same requests, interleaved rounds",
    "cpu": "CPU profile: FP32 vs optimised FP32 vs INT8 per model and served end to end, with the accuracy gates",
    "preprocess": "preprocessing per row before/after the stateless rewrite, and its worst cases (time, peak memory)",
    "video": "what a video candidate costs against a still: preprocessing and image-encoder time per item",
    "roof": "the cold route against the in-process roof (one pipeline per core), side by side: candidates/s and CPU "
            "ms per candidate",
    "memory": "resident memory of a served CPU pipeline per process, idle and under a stream of never-seen items",
    "profile_route": "where a candidate's time goes in the served route: py-spy samples of every Python backend "
                     "stub under never-seen items",
    "traffic": "the route past its capacity: goodput under deadlines at 1x-8x, an open-loop backlog, a cached "
               "caller beside 16-MP floods",
    "determinism": "one request's score spread alone, cached, from several callers, amid traffic and through the "
                   "reference ensemble (goal <= 1e-6)",
    "mixed_shapes": "two concurrent calls of different padding buckets to the text encoder, its batcher holding "
                    "them apart vs the served config (ragged allowed), side by side: latency per pair",
}

__all__ = ["BENCHMARKS"]
