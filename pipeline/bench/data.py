"""``data``: does loading keep up with training?"""
from __future__ import annotations

import time

import torch

from pipeline.bench.harness import STEP_CAPTION, format_table
from pipeline.eval.profile import median_wall

HELP = "loader samples/s with 1 and 2 workers next to the training step's"


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="tiny_albef_elip", help="config whose transforms and model are used")
    parser.add_argument("--num", type=int, default=1024, help="synthetic samples to load")
    parser.add_argument("--repeats", type=int, default=5)


def run(args) -> list[dict]:
    """Loader samples/s (decode + ALBEF train transforms) with 1 and 2 workers on synthetic
    shards, next to the samples/s of the config's training step on this machine."""
    import tempfile
    from dataclasses import replace

    from data_prep import synthetic
    from pipeline.config import load_config
    from pipeline.data.loader import TrainLoader
    from pipeline.models import build_model

    cfg = load_config(args.config)
    batch = cfg.data.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.build(tmp, num=args.num, image_size=max(cfg.data.image_size, 96), shard_size=args.num // 4,
                        min_shards=1)
        for workers in (1, 2):
            data_cfg = replace(cfg.data, train_shards=tmp, workers=workers, train_num_samples=args.num)
            loader = TrainLoader(data_cfg)
            start, seen = None, 0
            for i, b in enumerate(loader.iter_epoch(0)):
                if i == 0:  # worker start-up is not throughput
                    start = time.perf_counter()
                    continue
                seen += len(b["text"])
            rows.append({"method": f"loader, {workers} worker{'s' * (workers > 1)}",
                         "samples_per_s": seen / (time.perf_counter() - start)})
    model = build_model(cfg.model).train()
    size = cfg.data.image_size
    data = {"image": torch.randn(batch, 3, size, size), "text": [STEP_CAPTION] * batch, "epoch_progress": 1.0}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(data)["loss"].backward()
        optimizer.step()

    wall = median_wall(step, repeats=args.repeats)
    rows.append({"method": f"training step ({args.config}, batch {batch}, 1 process)", "samples_per_s": batch / wall})
    print(f"[bench] data: {args.num} synthetic samples, batch {batch}, {args.config}'s train transforms")
    print(format_table(rows, [("method", "what", "{}"), ("samples_per_s", "samples/s", "{:.1f}")]))
    verdict = "keeps up" if rows[1]["samples_per_s"] >= rows[2]["samples_per_s"] else "is the bottleneck"
    print(f"with 2 workers the loader {verdict} (1 worker: {rows[0]['samples_per_s']:.0f} samples/s); "
          "training ranks on one node share the CPU cores, so give each rank data.workers accordingly")
    return rows
