"""Evaluate a trained run.

    python -m pipeline.eval retrieval --run RUN_DIR [--checkpoint PATH] [--shards SPEC] [--k-test K]

Reads ``RUN_DIR/config.yaml``, loads the newest complete checkpoint (or ``--checkpoint``),
evaluates on ``--shards`` (default: the config's ``eval.shards``), prints the table, writes
``eval.json`` into the run directory and the scores to its TensorBoard.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from pipeline.config import ConfigError, load_config
from pipeline.models import build_model


def _retrieval(args) -> int:
    from pipeline.eval.retrieval import evaluate_shards, format_table
    from pipeline.train.checkpoint import load_weights, read_meta

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"error: --run {run}: no config.yaml (is this a run directory?)")
    cfg = load_config(run / "config.yaml")
    shards = args.shards or cfg.eval.shards
    if not shards:
        raise SystemExit("error: no evaluation shards: pass --shards or set eval.shards in the run's config")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(cfg.model)
    tag_dir = load_weights(model, args.checkpoint or run)
    model.to(device).eval()
    step = int(read_meta(tag_dir).get("step", 0))
    metrics = evaluate_shards(model, shards, image_size=cfg.data.image_size, batch_size=args.batch_size,
                              k_test=args.k_test or cfg.eval.k_test, max_words=cfg.data.max_words, device=device)
    metrics.update(checkpoint=str(tag_dir), step=step, shards=shards)
    out = Path(args.out) if args.out else run / "eval.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tensorboard")) as writer:
        for key, value in metrics.items():
            if isinstance(value, float):
                writer.add_scalar(f"eval/{key}", value, step)
    print(format_table(metrics))
    ratio = metrics["txt_r1"] / metrics["chance_txt_r1"], metrics["img_r1"] / metrics["chance_img_r1"]
    print(f"R@1 is {ratio[0]:.1f}x chance for text retrieval and {ratio[1]:.1f}x chance for image retrieval "
          f"(checkpoint {tag_dir.name}, step {step}); written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    ret = sub.add_parser("retrieval", help="zero-shot image-text retrieval (TR/IR R@1/5/10)")
    ret.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoints/)")
    ret.add_argument("--checkpoint", help="checkpoint tag directory or checkpoints dir (default: newest in --run)")
    ret.add_argument("--shards", help="evaluation shards (brace pattern or data_prep directory)")
    ret.add_argument("--k-test", type=int, default=None, help="ITC top-k re-ranked by ITM (default: config)")
    ret.add_argument("--batch-size", type=int, default=64)
    ret.add_argument("--device", default=None)
    ret.add_argument("--out", default=None, help="metrics JSON (default: RUN/eval.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"retrieval": _retrieval}[args.task](args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
