"""Checks of exported models: parity with PyTorch (`parity`), the CPU profile's gates (`cpu_gates`), the golden
data they run on (`golden`), and engine pre-flight against a node (`preflight`)."""
