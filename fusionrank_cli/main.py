"""`fusionrank` console script: parse the arguments, run one subcommand, map fusionrank's errors to exit code 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.project import ENV_HOME
from fusionrank_cli.parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (2 on a fusionrank error, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.project:
        # Through the environment, so Locust and Triton's Python-backend stubs started below see the same project.
        os.environ[ENV_HOME] = str(Path(args.project).expanduser().resolve())
    try:
        return int(args.handler(args) or 0)
    except FusionRankError as exc:
        print(f"fusionrank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
