"""`fusionrank tune`: a budgeted search over the pipeline's serving settings (`search`, `knobs`), each configuration
served and measured (`measure`, `ranking`), and its report (`report`); the command in `cli`."""

__all__: list[str] = []
