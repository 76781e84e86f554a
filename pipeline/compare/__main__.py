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
    plan = sub.add_parser("plan", help="list the runs (NAME SEED per line), or with --task I print run I's config "
                                       "and overrides one per line (what launch/slurm/sweep.sbatch trains)")
    plan.add_argument("sweep")
    plan.add_argument("--out", default=None)
    plan.add_argument("--only", action="append", default=None, metavar="NAME[,NAME]")
    plan.add_argument("--seeds", default=None, metavar="S[,S]")
    plan.add_argument("--task", type=int, default=None, help="run index (SLURM_ARRAY_TASK_ID)")
    plan.add_argument("--warm-start", action="store_true",
                      help="print the warm start's config and overrides instead (train it before the array)")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    rep = sub.add_parser("report", help="gather SWEEP_DIR into compare.md/json/csv and plots")
    rep.add_argument("sweep_dir")
    # key=value pairs may follow options: argparse leaves those over, and they are overrides too
    args, rest = parser.parse_known_args(argv)
    if rest:
        if args.cmd not in ("run", "plan") or any("=" not in r or r.startswith("-") for r in rest):
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
        runner = Runner(sweep, out, args.overrides, seeds, log=lambda msg: print(msg, file=sys.stderr))
        if args.cmd == "plan":
            tasks = runner.tasks(only)
            if args.warm_start:
                if sweep.warm_start is None:
                    raise ConfigError(f"{sweep.path}: warm_start: this sweep has none")
                print("\n".join(["warm_start", "-", sweep.warm_start.config, *runner.warm_start_overrides()]))
                return 0
            if args.task is None:
                print("\n".join(f"{name} {seed}" for name, seed in tasks))
                return 0
            if not 0 <= args.task < len(tasks):
                raise ConfigError(f"--task {args.task}: the sweep has runs 0..{len(tasks) - 1} (--array=0-{len(tasks) - 1})")
            name, seed = tasks[args.task]
            print("\n".join([name, str(seed), sweep.base, *runner.run_overrides(sweep.variants[name], seed)]))
            return 0
        runner.log = print
        states = runner.run(only)
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
