"""``python -m pipeline.compare run SWEEP [--out DIR] [--only NAME[,NAME]] [--seeds S[,S]] [key=value ...]``
and ``python -m pipeline.compare report SWEEP_DIR``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare",
                                     description="Train every variant of a token-reduction sweep and compare "
                                                 "quality next to measured cost.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train and evaluate every variant x seed (skips finished, resumes the rest)")
    run.add_argument("sweep", help="a shipped sweep name or a sweep YAML path")
    run.add_argument("--out", default=None, help="SWEEP_DIR (default runs/compare/<sweep name>)")
    run.add_argument("--only", action="append", default=None, metavar="NAME[,NAME]",
                     help="run only these variants (repeatable, or comma-separated)")
    run.add_argument("--seeds", default=None, metavar="S[,S]", help="override the sweep's seeds, e.g. 0,1")
    run.add_argument("--report", action="store_true", help="write the report when the runs are done")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="applied to every variant after the sweep's own (e.g. data.train_shards=...); "
                          "they may come before or after the options")
    rep = sub.add_parser("report", help="gather SWEEP_DIR into compare.md/json/csv and plots")
    rep.add_argument("sweep_dir")
    # key=value pairs may follow options: argparse leaves those over, and they are overrides too
    args, rest = parser.parse_known_args(argv)
    if rest:
        if args.cmd != "run" or any("=" not in r or r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]

    if args.cmd == "report":
        from .report import write_report

        try:
            print(write_report(Path(args.sweep_dir)))
        except ConfigError as err:
            print(f"report error: {err}", file=sys.stderr)
            return 2
        return 0

    from .runner import Runner
    from .sweep import load_sweep

    try:
        sweep = load_sweep(args.sweep)
        try:
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        except ValueError:
            raise ConfigError(f"--seeds: expected comma-separated ints, got {args.seeds!r}") from None
        only = [n for part in args.only for n in part.split(",") if n] if args.only else None
        out = Path(args.out or Path("runs/compare") / sweep.path.stem)
        states = Runner(sweep, out, args.overrides, seeds).run(only)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    failed = {k: v for k, v in states.items() if v != "finished"}
    print(f"[compare] {len(states) - len(failed)}/{len(states)} runs finished in {out}"
          + (f"; not finished: {', '.join(f'{k} ({v})' for k, v in failed.items())}" if failed else ""))
    if args.report:
        from .report import write_report

        print(write_report(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
