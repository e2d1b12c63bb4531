"""FP16-safe constants in exported ONNX graphs, so an FP16 TensorRT engine computes what the FP32 graph does.

transformers builds the attention mask as `torch.where(mask, 0, torch.finfo(float32).min)` (`masking_utils`), so
the exported text encoder carries -3.4e38, which FP16 cannot hold (its range ends at +-65504): in an FP16 engine the
constant becomes -inf, and a row whose scores are all masked turns into NaN instead of a uniform softmax. The mask's
job is only to make exp(score + mask) vanish next to the kept tokens: -1e4 does that in FP32 and FP16 alike
(exp(-1e4) underflows to 0 in both), as BERT's own exporters used before `finfo.min`. This rewrite replaces every
float constant at or beyond FP32's sentinel range (|x| >= 1e38, what `finfo(...).min/max` produce) with -1e4 / 1e4
and refuses any other constant FP16 cannot hold, naming it. Parity with PyTorch is checked on the rewritten graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusionrank.contract.errors import FusionRankError

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
SENTINEL = 1e38  # finfo(float32).min / max are +-3.4e38: masking sentinels, not data
MASK_VALUE = 1e4  # FP16-safe: exp(-1e4) is 0 in FP16 and FP32
FLOAT_TYPES = (1, 10, 11)  # ONNX FLOAT, FLOAT16, DOUBLE


def _rewrite(tensor, where: str) -> int:
    """Replace the sentinels of one TensorProto in place; the count replaced (FusionRankError on other overflows)."""
    from onnx import numpy_helper

    if tensor.data_type not in FLOAT_TYPES or tensor.data_location == 1:
        return 0
    values = numpy_helper.to_array(tensor)
    sentinels = np.abs(values) >= SENTINEL
    others = (np.abs(values) > FP16_MAX) & ~sentinels & np.isfinite(values)
    if others.any():
        raise FusionRankError(f"{where}: constant {tensor.name or '(unnamed)'} holds {values[others].flat[0]:g}, "
                              f"beyond FP16's range (+-{FP16_MAX:g}); an FP16 engine would overflow it")
    if not sentinels.any():
        return 0
    fixed = np.where(sentinels, np.sign(values) * MASK_VALUE, values).astype(values.dtype)
    tensor.CopyFrom(numpy_helper.from_array(fixed, tensor.name))
    return int(sentinels.sum())


def fp16_safe_constants(path: Path) -> int:
    """Rewrite `path` in place with FP16-safe mask constants; the number of values replaced."""
    import onnx

    model = onnx.load(str(path))
    replaced = sum(_rewrite(t, str(path)) for t in model.graph.initializer)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                replaced += _rewrite(attribute.t, f"{path} node {node.name or node.op_type}")
            elif attribute.type == onnx.AttributeProto.FLOAT and abs(attribute.f) >= SENTINEL:
                attribute.f = float(np.sign(attribute.f) * MASK_VALUE)
                replaced += 1
    if replaced:
        onnx.save(model, str(path))
    return replaced


def constants_beyond_fp16(path: Path) -> list[str]:
    """Every float constant of the graph FP16 cannot hold, as 'name: value' (empty: an FP16 engine is safe)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(node.name or node.op_type, a.t) for node in model.graph.node for a in node.attribute
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
    found = []
    for name, tensor in tensors:
        if tensor.data_type in FLOAT_TYPES and tensor.data_location != 1:
            values = numpy_helper.to_array(tensor)
            beyond = np.abs(values[np.isfinite(values)]) > FP16_MAX
            if beyond.any():
                found.append(f"{name}: {values[np.isfinite(values)][beyond].flat[0]:g}")
    found += [f"{node.name or node.op_type}.{a.name}: {a.f:g}" for node in model.graph.node for a in node.attribute
              if a.type == onnx.AttributeProto.FLOAT and abs(a.f) > FP16_MAX]
    return found
