"""What a node offers and how models run on it: node facts (`facts`), the pinned TensorRT release, TensorRT access
(`trt_api`), CUDA memory and the TensorRT runner."""
