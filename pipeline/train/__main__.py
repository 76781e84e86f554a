"""``python -m pipeline.train --config NAME_OR_PATH [key=value ...]`` (console script ``elip-train``).

Runs under torchrun, the deepspeed launcher, srun, or as a single plain process.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config, shipped_configs
from pipeline.data.shards import allow_pipe_shards, check_shard_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Pre-train a language-image model with DeepSpeed. Overrides are dotted key=value pairs, "
                    "e.g. train.run_dir=runs/x optim.lr=2e-4 data.batch_size=32 train.deepspeed=zero3.")
    parser.add_argument("--config", required=True,
                        help=f"shipped config name ({', '.join(shipped_configs()) or 'none yet'}) or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--allow-pipe-shards", action="store_true",
                        help="let pipe:CMD shard specs run CMD in a shell (refused otherwise; never set by a config)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    allow_pipe_shards(args.allow_pipe_shards)
    try:
        cfg = load_config(args.config, args.overrides)
        check_shard_spec(cfg.data.train_shards, "data.train_shards", cfg.data.train_weights)
        if (cfg.eval.every or cfg.eval.every_epochs) and cfg.eval.shards:  # the trainer reads them only when it evaluates
            check_shard_spec(cfg.eval.shards, "eval.shards")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from pipeline.models.weights import CheckpointError, WeightsMismatchError
    from pipeline.train.loop import train
    from pipeline.train.ops import announce_op_builds
    from pipeline.train.optim import build_ds_config, offloads_optimizer

    try:
        announce_op_builds(offloads_optimizer(build_ds_config(cfg, world_size=1)))
        train(cfg)
    except ConfigError as err:  # found once the hardware is known (e.g. train.precision)
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, WeightsMismatchError) as err:  # names the file; status.json says 'failed' with it
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
