"""Release checks of a node: the upgrade report (`upgrade*`: measure, compare, markdown) and the GPU check
(`gpu_check`, `gpu_steps`, `gpu_report`, `precision_gate`: each engine at the lowest precision that passes the
accuracy gate)."""
