"""The one place that imports TensorRT: the module itself (or what to install), its logger, its error type.

Building (`export.onnx2trt`, `export.trt_calibration`) and running (`export.trt_runner`) get TensorRT from here, so
the install hint, the logger that keeps TensorRT's errors for the exception message and `EngineBuildError` are
written once. Importing this module never imports TensorRT: `import_tensorrt()` does, on demand, so the CPU paths
(and `fusionrank --help`) run without the `[gpu]` extra.
"""

from __future__ import annotations

import logging

from fusionrank.errors import FusionRankError

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT is not installed in this environment. Engines are built on a GPU node: there run\n"
                "    pip install '.[gpu]'        (tensorrt-cu12==10.13.3.9 and cuda-python, see pyproject.toml)\n"
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


def make_logger(trt):
    """A TensorRT logger that forwards to `logging` and keeps every error for the exception message."""

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CapturingLogger()
