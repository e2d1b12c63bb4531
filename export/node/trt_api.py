"""The one place that imports TensorRT: the module itself (or what to install), its logger, its error type.

Building (`export.convert.onnx2trt`, `export.convert.trt_calibration`) and running (`export.node.trt_runner`) get
TensorRT from here, so the install hint, the logger and `EngineBuildError` are written once. Importing this module never
imports TensorRT: `import_tensorrt()` does, on demand, so the CPU paths (and `fusionrank --help`) run without the
`[gpu]` extra.

TensorRT keeps one logger per process: the first `Builder`/`Runtime` registers it and later ones are expected to pass
the same object (a second logger is not used for everything, and one freed while TensorRT still holds it leaves a
dangling pointer). `process_logger()` therefore returns one logger, alive as long as the process; each operation
collects only its own errors with `with logger.capture() as errors:`, so an old failure never reappears in the
message of a later one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fusionrank.contract.errors import FusionRankError

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT is not installed in this environment. Engines are built on a GPU node: there run\n"
                "    pip install '.[gpu]'        (exactly the TensorRT of the serving image, see pyproject.toml)\n"
                "or use the NGC Triton image, then run `fusionrank build-engines` again.")


class EngineBuildError(FusionRankError):
    """TensorRT could not parse, build, load or run an engine; the message holds TensorRT's own errors."""


def import_tensorrt():
    """The `tensorrt` module, or None when the `[gpu]` extra is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def require_tensorrt():
    """The `tensorrt` module, or EngineBuildError saying what to install."""
    trt = import_tensorrt()
    if trt is None:
        raise EngineBuildError(INSTALL_HINT)
    return trt


_process_logger: tuple[object, object] | None = None  # (tensorrt module, its logger)
_logger_lock = threading.Lock()


def process_logger(trt):
    """The process's one TensorRT logger (created on first use): forwards to `logging`, errors to `capture()`."""
    global _process_logger
    with _logger_lock:
        if _process_logger is None or _process_logger[0] is not trt:
            _process_logger = (trt, _make_logger(trt))
        return _process_logger[1]


def _make_logger(trt):
    class CapturingLogger(trt.ILogger):
        """Logs through `logging`; errors also go to every list handed out by a running `capture()`."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self._captures: list[list[str]] = []
            self._lock = threading.Lock()

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                log.error("TensorRT: %s", msg)
                with self._lock:
                    for errors in self._captures:
                        errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        @contextmanager
        def capture(self) -> Iterator[list[str]]:
            """The errors TensorRT logs while the block runs (a fresh list each time)."""
            errors: list[str] = []
            with self._lock:
                self._captures.append(errors)
            try:
                yield errors
            finally:
                with self._lock:  # by identity: two captures with the same errors compare equal
                    self._captures = [c for c in self._captures if c is not errors]

    return CapturingLogger()


def describe(errors: list[str], fallback: str = "unknown error") -> str:
    """TensorRT's errors of one operation, joined for an exception message."""
    return "; ".join(errors) or fallback
