"""The Triton models: one module per kind of model, its Python-backend class beside its config function
(`preprocess`, `exported`, `pool`, `ensemble`, `route`); `render` writes `model_repository/` from them."""
