"""The model science: encoders and the fusion ranker, training and evaluation, embeddings, ranking metrics, the
synthetic data set (`synthetic_data`) and the PyTorch reference pipeline."""
