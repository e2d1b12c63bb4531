"""How each TensorRT tensor type is held in numpy on the host, for `export.node.trt_runner`.

`trt.nptype` maps the types numpy has (float32, float16, int8, int32, int64, bool, uint8) and raises TypeError for
the others. bfloat16 has no numpy type: it travels as its 16 raw bits (uint16) and is converted to and from float32
here (bfloat16 is the upper half of a float32; rounding to nearest even). FP8, INT4 and FP4 I/O tensors are refused
with a message naming the tensor: fusionrank's engines take and return int64/float32 (their ONNX contract).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from export.node.trt_api import EngineBuildError


@dataclass(frozen=True)
class HostType:
    """A tensor's host representation: the dtype in the staging buffer, the dtype returned, and the conversions."""

    numpy_host: np.dtype
    numpy_out: np.dtype
    to_host: Callable[[np.ndarray], np.ndarray]
    from_host: Callable[[np.ndarray], np.ndarray]


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    nan = np.isnan(values)
    return np.where(nan, np.uint32(0x7FC0), rounded).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def host_type(trt, dtype, name: str) -> HostType:
    """The host representation of a tensor of TensorRT type `dtype` (EngineBuildError for types numpy cannot hold)."""
    if dtype == getattr(trt, "bfloat16", object()):
        return HostType(np.dtype(np.uint16), np.dtype(np.float32), float32_to_bfloat16_bits, bfloat16_bits_to_float32)
    try:
        held = np.dtype(trt.nptype(dtype))
    except TypeError:
        raise EngineBuildError(f"tensor {name!r} has TensorRT type {dtype}, which has no numpy equivalent; fusionrank "
                               "engines take and return int64/float32 tensors (re-export the ONNX model)") from None
    # Half-precision outputs are widened: parity and the callers compare in float32.
    out = np.dtype(np.float32) if held == np.float16 else held
    return HostType(held, out, lambda a: np.ascontiguousarray(a, dtype=held), lambda h: h.astype(out, copy=True))
