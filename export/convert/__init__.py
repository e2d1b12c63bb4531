"""Conversion steps, each `<source>2<target>` and runnable on its own: `torch2onnx`, `onnx2cpu`, `onnx2trt` (with the
TensorRT build pieces `trt_calibration`, `trt_precision`; `fp16_constants` makes exported graphs FP16-safe)."""
