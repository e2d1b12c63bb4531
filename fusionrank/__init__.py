"""fusionrank: multimodal recommendation ranker, from PyTorch to a Triton ensemble."""
