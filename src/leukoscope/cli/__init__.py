"""``leukoscope`` command line. Each subcommand module has ``add_parser(subparsers)`` and ``main(args) -> int``,
so tests call ``main(parse_args([...]))`` in-process."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> module under leukoscope.cli; modules are imported lazily so `leukoscope data ...` does not import torch.
SUBCOMMANDS = {
    "data": "data",
    "train": "train",
    "ensemble": "ensemble",
    "evaluate": "evaluate",
    "predict": "predict",
    "explain": "explain",
    "faithfulness": "faithfulness",
    "export": "export",
    "compare": "compare",
    "scan": "scan",
    "diagnose": "diagnose",
    "flow": "flow",
    "fuse": "fuse",
    "serve": "serve",
    "models": "models",
    "ood": "ood",
    "detector": "detector",
}


def _available() -> dict[str, object]:
    return {name: importlib.import_module(f"leukoscope.cli.{module}") for name, module in SUBCOMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leukoscope",
        description="Find leukemia in blood smear images and explain what was seen.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _available().values():
        mod.add_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from leukoscope.errors import LeukoscopeError

    try:
        return int(args.func(args) or 0)
    except (LeukoscopeError, ValueError, FileNotFoundError) as exc:
        print(f"leukoscope {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
