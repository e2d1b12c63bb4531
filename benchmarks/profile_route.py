"""`fusionrank bench profile_route`: where a candidate's time goes in the served route, from py-spy samples of every
Python backend stub (the route's instances and each ONNX Runtime member) while closed-loop callers send never-seen
items (every candidate a cache miss).

Each stub is sampled for `--seconds` (`py-spy record --format raw`: Python frames, and with `--native` ONNX
Runtime's own; without `--native` threads py-spy sees waiting are not sampled, so samples are CPU-busy time). Every
sample is put in one category by its innermost recognised frame (decode, tokenise, hash, copies, BLS, ONNX Runtime,
idle, ...). Per process, the share of its samples in each category and its busy milliseconds per candidate scored
are reported, so the route's Python work per candidate can be set beside the encoders'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

# (category, substrings of a frame `function (file:line)`), checked from the innermost frame outwards; the first
# frame that matches any rule names the sample's category.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle (waiting for work)", ("epoll_wait", "EpollSelector.select", "Condition.wait", "SleepFor",
                                 "pthread_cond", "futex", "sem_wait", "__lll_lock_wait", "PyThread_acquire_lock")),
    ("tokenise", ("preprocess/text.py", "tokenizers")),
    ("decode image", ("preprocess/image.py", "PIL/", "libjpeg", "libpng", "ImagingDecode", "ImagingResample")),
    ("decode video", ("preprocess/video.py", "av/", "libav")),
    ("decode audio", ("preprocess/audio.py", "soundfile", "pocketfft", "scipy")),
    ("hash / cache keys", ("hashlib", "item_keys.py", "_hashlib", "sha256", "blake2", "route/cache.py")),
    ("route logic, BLS calls and tensors", ("async_exec", "InferenceRequest", "triton_python_backend_utils", "as_numpy",
                               "get_output_tensor", "pb_utils", "route/stages.py", "triton/route.py")),
    ("validation and candidate preparation", ("preprocess/request.py", "ragged.py", "preprocess/__init__.py")),
    ("copies and concatenation", ("concatenate", "ascontiguousarray", "np.array", "copyto", "memcpy", "memmove",
                                  "__memcpy")),
    ("ONNX Runtime", ("onnxruntime", "libonnxruntime", "mlas", "Mlas")),
    ("Triton model shell", ("fusionrank/triton/", "model.py")),
)
OTHER = "other"


def categorise(stack: list[str]) -> str:
    """The category of one sample (frames from outermost to innermost)."""
    for frame in reversed(stack):
        for name, needles in RULES:
            if any(n in frame for n in needles):
                return name
    return OTHER


def read_raw(path: Path) -> Counter:
    """py-spy's raw (collapsed) output: `frame;frame;... count` per line -> samples per category."""
    counts: Counter = Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[categorise(stack.split(";"))] += int(count)
    return counts


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=20.0, help="sampling time per stub (s)")
    parser.add_argument("--callers", type=int, default=8, help="closed-loop callers")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per request")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="native frames too (ONNX Runtime, decoders)")
    parser.add_argument("--out", default=None, help="folder for the raw profiles and profile.json")


def _record(pid: int, seconds: float, rate: int, native: bool, path: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds)),
           "--rate", str(rate), "--format", "raw", "--output", str(path)]
    # --nonblocking (no pause of the process per sample) cannot unwind native frames
    return subprocess.Popen(cmd + (["--native"] if native else ["--nonblocking"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def main(args: argparse.Namespace, out=sys.stdout) -> int:
    """Serve, load, sample every stub, print the table per process and write profile.json."""
    from benchmarks._args import repository_of, spec_of

    spec, repo = spec_of(args), repository_of(args)
    from benchmarks.lib import describe_machine, load_average
    from benchmarks.lib.memory import process_tree
    from benchmarks.served import ServedLoad, Stream
    from fusionrank.contract.spec import ServingProfile
    from fusionrank.model.synthetic_data import load_benchmark
    from fusionrank.server.launcher import TritonServer

    folder = Path(args.out or f"reports/profile-route-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.mkdir(parents=True, exist_ok=True)
    bench = load_benchmark(spec)
    with TritonServer.for_spec(spec, repo, ServingProfile.CPU, log_name="tritonserver-profile") as server:
        stubs = [p for p in process_tree(server.process.pid) if p.label.startswith("stub:")]
        load = ServedLoad(spec, bench, server.grpc_url, spec.serving.route,
                          Stream(candidates=args.candidates, callers=args.callers, novel_share=1.0))
        result: dict = {}
        runner = threading.Thread(target=lambda: result.setdefault("load", load.window(args.seconds + 10)))
        runner.start()
        time.sleep(5)  # past the callers' warm-up
        recorders = [(p, folder / f"{p.label[5:]}-{p.pid}.txt") for p in stubs]
        procs = [_record(p.pid, args.seconds, args.rate, args.native, path) for p, path in recorders]
        for proc in procs:
            proc.wait(timeout=args.seconds + 120)
        runner.join()
        load.close()
    sampled = result["load"].throughput * args.candidates * args.seconds  # candidates scored while sampling
    report = {"machine": describe_machine(), "load_average": load_average(),
              "candidates_per_s": result["load"].throughput * args.candidates, "processes": {}}
    out.write(f"route under {args.callers} callers of never-seen {args.candidates}-candidate requests: "
              f"{report['candidates_per_s']:.1f} candidates/s; {report['machine']}\n")
    for (proc_info, path), proc in zip(recorders, procs):
        if not path.is_file():
            out.write(f"  {proc_info.label} ({proc_info.pid}): no profile ({proc.stderr.read().strip()[:200]})\n")
            continue
        counts = read_raw(path)
        total = sum(counts.values()) or 1
        busy = total - counts.get("idle (waiting for work)", 0)
        per_candidate_ms = 1000.0 * busy / args.rate / max(sampled, 1)
        report["processes"][f"{proc_info.label}-{proc_info.pid}"] = {
            "samples": total, "busy_ms_per_candidate": per_candidate_ms,
            "shares": {k: v / total for k, v in counts.most_common()}}
        shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in counts.most_common() if v / total >= 0.01)
        out.write(f"  {proc_info.label} ({proc_info.pid}): {per_candidate_ms:.2f} busy ms per candidate; {shares}\n")
    (folder / "profile.json").write_text(json.dumps(report, indent=2))
    out.write(f"wrote {folder}\n")
    return 0
