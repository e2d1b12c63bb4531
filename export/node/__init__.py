"""What a node offers and how models run on it: node facts (`facts`), the pinned TensorRT release, TensorRT access
(`trt_api`), CUDA memory and the TensorRT runner, the driver against the CUDA of the TensorRT (`cuda_driver`,
standard library only: `python3 -m export.node.cuda_driver` runs before anything is installed)."""
