"""Side-by-side benchmarks: every method measured in one process, reported as ratios to ``none``.

    python -m pipeline.bench tokens [--quick] [--json]          one ViT encoder, every reduction
    python -m pipeline.bench step --backbone albef [--quick]    one full pre-training step
    python -m pipeline.bench table [--quick]                    the paper's Table 1: every backbone x reduction
    python -m pipeline.bench data [--json]                      loader throughput vs the training step
    python -m pipeline.bench evlgen [--quick] [--json]          EVLGen connectors: TomeFormer, Q-Former, no merge
    python -m pipeline.bench autobatch [--quick] [--json]       micro-batch each reduction admits in one budget

FLOPs and activation bytes are deterministic and back the claims; wall time is a median over
repeats taken round-robin across methods (so drift hits all of them alike) and is only
meaningful as a ratio. With ``--json`` the last line printed is one JSON object ``{"rows": [...]}``.

Layout: :mod:`~pipeline.bench.harness` measures and reports, :mod:`~pipeline.bench.models`
builds the paper-size models from the shipped configs, one module per benchmark declares its
own flags (``add_arguments``) and runs it (``run``); :mod:`~pipeline.bench.cli` is the parser.
"""
from pipeline.bench.cli import main

__all__ = ["main"]
