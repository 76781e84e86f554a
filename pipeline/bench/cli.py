"""``python -m pipeline.bench SUBCOMMAND ...`` (also ``elip-bench``): one subcommand per
benchmark module, the flags they share declared once here."""
from __future__ import annotations

import argparse
import json

from pipeline.bench import autobatch, data, evlgen, step, table, tokens

# subcommand -> module with HELP, add_arguments(parser), run(args) -> rows, and the meanings of
# the shared flags it takes: QUICK (--quick, --batch; BATCH: --batch's), REPEATS (--repeats)
BENCHMARKS = {"tokens": tokens, "step": step, "table": table, "data": data, "evlgen": evlgen,
              "autobatch": autobatch}


def _shared(module) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--json``; with a ``QUICK`` meaning also ``--quick``
    and ``--batch``; with a ``REPEATS`` meaning (timed repeats) ``--repeats``."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="end with one JSON line {'rows': [...]}")
    if hasattr(module, "QUICK"):
        parent.add_argument("--quick", action="store_true", help=module.QUICK)
        parent.add_argument("--batch", type=int, default=None, help=getattr(module, "BATCH", None))
    if hasattr(module, "REPEATS"):
        parent.add_argument("--repeats", type=int, default=None, help=module.REPEATS)
    return parent


def build_parser() -> argparse.ArgumentParser:
    import pipeline.bench

    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=pipeline.bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(name, help=module.HELP, parents=[_shared(module)])
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = args.run(args)
    if args.json:
        print(json.dumps({"rows": rows}))
    return 0
