"""Resident memory of a served pipeline: every process of a tritonserver's tree (the server and each Python
backend stub, one per model instance), named by what it runs, with psutil.

RSS counts shared pages (the C++ runtime, numpy, ONNX Runtime) once per process that maps them, as `ps` and the
kernel's OOM killer do; USS (pages only that process holds) is given beside it where the kernel lets us read it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from fusionrank.contract.errors import FusionRankError

MIB = 1 << 20
_STUB = "triton_python_backend_stub"


class ProcessReadError(FusionRankError):
    """A process tree could not be read."""


@dataclass(frozen=True)
class ProcessMemory:
    """One process: its label (`tritonserver`, or the model folder a stub serves), pid, RSS and USS in bytes."""

    label: str
    pid: int
    rss: int
    uss: int | None = None

    def as_dict(self) -> dict:
        return {"label": self.label, "pid": self.pid, "rss_mib": round(self.rss / MIB, 1),
                "uss_mib": None if self.uss is None else round(self.uss / MIB, 1)}


def _label(cmdline: list[str], name: str) -> str:
    """`tritonserver`, or `stub:<model>` for a Python backend stub (its first argument is the model's model.py)."""
    if cmdline and cmdline[0].endswith(_STUB) and len(cmdline) > 1:
        match = re.search(r"([^/]+)/\d+/model\.py$", cmdline[1])
        return f"stub:{match.group(1)}" if match else f"stub:{cmdline[1]}"
    return name


def process_tree(pid: int) -> list[ProcessMemory]:
    """The process `pid` and all its descendants, each with its RSS (and USS where readable)."""
    import psutil  # the loadtest extra; only benchmarks read process memory

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error as exc:
        raise ProcessReadError(f"process {pid}: cannot read its tree ({exc})") from exc
    out = []
    for proc in procs:
        try:
            with proc.oneshot():
                label = _label(proc.cmdline(), proc.name())
                rss = proc.memory_info().rss
            try:
                uss = proc.memory_full_info().uss
            except psutil.Error:
                uss = None
        except psutil.NoSuchProcess:  # ended while we looked
            continue
        out.append(ProcessMemory(label, proc.pid, rss, uss))
    return out


def total_rss(processes: Iterable[ProcessMemory]) -> int:
    """Summed RSS in bytes."""
    return sum(p.rss for p in processes)


def by_label(processes: Iterable[ProcessMemory]) -> dict[str, tuple[int, int]]:
    """Process count and summed RSS (bytes) per label, largest first."""
    groups: dict[str, list[int]] = {}
    for p in processes:
        groups.setdefault(p.label, []).append(p.rss)
    return dict(sorted(((k, (len(v), sum(v))) for k, v in groups.items()), key=lambda kv: -kv[1][1]))


def describe(processes: list[ProcessMemory]) -> str:
    """One line: the total and each label's processes and MiB."""
    parts = [f"{label} x{n} {rss / MIB:.0f}" for label, (n, rss) in by_label(processes).items()]
    return f"{total_rss(processes) / MIB:.0f} MiB RSS in {len(processes)} processes (" + ", ".join(parts) + " MiB)"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by `pid` and its descendants (threads included)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error as exc:
        raise ProcessReadError(f"process {pid}: cannot read its tree ({exc})") from exc
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total
