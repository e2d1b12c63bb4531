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


def cpu_by_label(pid: int, root_label: str | None = None) -> dict[str, float]:
    """User + system CPU seconds used so far by `pid` and its descendants (threads included), summed per label
    (`tritonserver`, `stub:<model>` as `process_tree` names them; `pid` itself as `root_label` if given)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error as exc:
        raise ProcessReadError(f"process {pid}: cannot read its tree ({exc})") from exc
    totals: dict[str, float] = {}
    for proc in procs:
        try:
            with proc.oneshot():
                label = root_label if root_label and proc.pid == pid else _label(proc.cmdline(), proc.name())
                times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        totals[label] = totals.get(label, 0.0) + times.user + times.system
    return totals


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by `pid` and its descendants (threads included)."""
    return sum(cpu_by_label(pid).values())


@dataclass(frozen=True)
class CpuShare:
    """Where a measured stretch's CPU went: seconds per process label (the server's tree and `callers`, the
    measuring process, whose callers share the cores), over `wall_s` on `cores` cores."""

    seconds: dict[str, float]
    wall_s: float
    cores: int

    @classmethod
    def between(cls, before: dict[str, float], after: dict[str, float], wall_s: float, cores: int) -> CpuShare:
        """The difference of two `cpu_by_label`-style readings (a label that appeared counts from 0)."""
        return cls({k: v - before.get(k, 0.0) for k, v in after.items()}, wall_s, cores)

    @property
    def busy(self) -> float:
        """The share of the cores these processes kept busy."""
        return sum(self.seconds.values()) / (self.wall_s * self.cores) if self.wall_s > 0 else float("nan")

    def per_unit_ms(self, units: int) -> dict[str, float]:
        """CPU milliseconds per unit of work (a request, a candidate) by label, largest first; labels that used
        none (an idle helper process) left out."""
        ranked = sorted(((k, v) for k, v in self.seconds.items() if v > 0), key=lambda kv: -kv[1])
        return {k: 1000.0 * v / units for k, v in ranked} if units else {}

    def describe(self, units: int, unit: str = "request") -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.per_unit_ms(units).items())
        total = 1000.0 * sum(self.seconds.values()) / units if units else float("nan")
        return (f"{total:.1f} CPU ms per {unit} ({parts}); {100 * self.busy:.0f} % of {self.cores} cores busy "
                f"over {self.wall_s:.1f} s")

    def as_dict(self, units: int) -> dict:
        return {"cpu_ms_per_request": {k: round(v, 3) for k, v in self.per_unit_ms(units).items()},
                "busy": round(self.busy, 4), "wall_s": round(self.wall_s, 2), "cores": self.cores}
