"""The ``fedq`` command line. Library code logs; only this module writes to the console."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from fedq.bench import BENCHES


def _bench(args: argparse.Namespace) -> int:
    mod = importlib.import_module(f"fedq.bench.{args.bench}")
    result = mod.run(args)
    if getattr(args, "json", None):
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedq", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("bench", help="run a benchmark and print ratios against a same-run baseline")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name in BENCHES:
        try:
            mod = importlib.import_module(f"fedq.bench.{name}")
        except ModuleNotFoundError:
            continue
        bp = bsub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
        bp.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        mod.add_arguments(bp)
        bp.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
