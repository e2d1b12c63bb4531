"""How an engine gets its precision: weak typing (builder flags) or strong typing (the ONNX graph's own types).

TensorRT 10.13, the release pinned for serving, documents: weak typing (`BuilderFlag.FP16` / `INT8` letting the
builder pick lower precision per layer) is deprecated since 10.12; implicit INT8 calibration (`int8_calibrator`,
`set_calibration_profile`, `IInt8EntropyCalibrator2`) since 10.1. Both still run in 10.x and are removed in
TensorRT 11, where every network is strongly typed: FP16 comes from an ONNX already converted to mixed precision
(ModelOpt AutoCast) and INT8 from explicit quantization, QuantizeLinear/DequantizeLinear (Q/DQ) nodes in the ONNX.

What fusionrank builds:
- an ONNX with Q/DQ nodes (explicitly quantized, e.g. by ModelOpt or a QAT export) becomes a strongly typed network
  (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`) with no precision flags and no calibrator, after checking the
  Q/DQ nodes against TensorRT's rule that quantization is symmetric and signed (INT8/FP8, zero point 0), so a graph
  made for ONNX Runtime on CPU (unsigned, asymmetric activations) is refused with the node named instead of failing
  inside the parser;
- the plain FP32 export keeps the weak-typing path of 10.x: fp32 no flag, fp16 the FP16 flag, int8 the INT8 flag
  (FP16 fallback) with entropy calibration on catalogue samples. It is not migrated because strong typing needs a
  converted graph (AutoCast mixed precision, or a Q/DQ graph quantized by TensorRT's rules) whose accuracy must be
  proven against the golden outputs and ranking parity on a GPU, and none was available to this work. Moving to
  TensorRT 11 therefore needs that conversion step first; the build logs this at every weakly typed FP16/INT8 build.
"""

from __future__ import annotations

import logging
from pathlib import Path

from export.node.trt_api import EngineBuildError

log = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# ONNX TensorProto element types TensorRT quantizes to: INT8, FLOAT8E4M3FN (FP8 is symmetric by definition).
SIGNED_QUANT_TYPES = {3: "INT8", 17: "FLOAT8E4M3FN"}

WEAK_TYPING_NOTE = ("weakly typed {precision} build (BuilderFlag.{flag}): deprecated since TensorRT 10.12{calib}, "
                    "removed in TensorRT 11; see export/convert/trt_precision.py")


def _constant_tensors(graph) -> dict:
    """Initializers and Constant-node values of a graph, by name."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensors[node.output[0]] = value
    return tensors


def _zero_point_problem(node, tensors) -> str | None:
    from onnx import numpy_helper  # onnx is only needed where engines are built, not in the serving image

    if len(node.input) < 3 or not node.input[2]:
        return None  # no zero point: TensorRT's parser reads it as 0
    zero = tensors.get(node.input[2])
    if zero is None:
        return f"zero point {node.input[2]!r} is computed at run time; TensorRT needs a constant 0"
    if zero.data_type not in SIGNED_QUANT_TYPES:
        return (f"zero point {node.input[2]!r} has ONNX element type {zero.data_type} (unsigned or wider); "
                "TensorRT quantizes to signed INT8 or FP8 only")
    if zero.data_location == 1:  # external data was not loaded: cannot look, the parser will
        return None
    if numpy_helper.to_array(zero).any():
        return f"zero point {node.input[2]!r} is not 0 (asymmetric); TensorRT supports symmetric quantization only"
    return None


def explicitly_quantized(onnx_file: Path) -> bool:
    """True when the ONNX graph has Q/DQ nodes; EngineBuildError naming every node TensorRT could not take."""
    import onnx  # only needed where engines are built, not in the serving image
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(onnx_file), load_external_data=False).graph
    except DecodeError:
        return False  # not an ONNX model: TensorRT's parser says why, with the rest of its errors
    nodes = [n for n in graph.node if n.op_type in QDQ_OPS]
    if not nodes:
        return False
    tensors = _constant_tensors(graph)
    problems = [f"{n.op_type} {n.name or n.output[0]!r}: {why}" for n in nodes
                if (why := _zero_point_problem(n, tensors))]
    if problems:
        raise EngineBuildError(f"{onnx_file}: explicitly quantized, but not the way TensorRT requires:\n  "
                               + "\n  ".join(problems))
    return True


def network_flags(trt, strongly_typed: bool) -> int:
    """`Builder.create_network` flags: STRONGLY_TYPED for an explicitly quantized graph (explicit batch is the only
    mode in TensorRT 10, so nothing else is set)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0


def weak_typing_flags(trt, precision: str) -> list:
    """Builder flags of a weakly typed build of `precision` ('fp32', 'fp16', 'int8'), with the deprecation logged."""
    if precision == "fp32":
        return []
    if precision == "fp16":
        log.warning(WEAK_TYPING_NOTE.format(precision="FP16", flag="FP16", calib=""))
        return [trt.BuilderFlag.FP16]
    log.warning(WEAK_TYPING_NOTE.format(precision="INT8", flag="INT8",
                                        calib=", implicit INT8 calibration since 10.1"))
    # FP16 is the fallback of layers without an INT8 kernel (instead of FP32).
    return [trt.BuilderFlag.INT8, trt.BuilderFlag.FP16]
