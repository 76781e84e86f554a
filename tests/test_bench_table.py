"""`python -m pipeline.bench table`: BLIP's and METER's deterministic targets (FLOPs and saved
activations of one full paper-size pre-training step; no timing). Only the three methods the
targets are about are measured, at batch 2: FLOPs are linear in the batch, so the ratios are
those of batch 36. ALBEF's are asserted by tests/test_bench_step.py."""
import json
import subprocess
import sys

import pytest

from tests.helpers_train import repo_root, subprocess_env


@pytest.mark.slow
def test_blip_and_meter_meet_the_paper_ratios_they_can():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "table", "--backbones", "blip,meter", "--methods",
         "none,elip-lookahead,elip-reuse", "--batch", "2", "--repeats", "0", "--json"],
        cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["backbone"], r["method"]): r for r in json.loads(proc.stdout.strip().splitlines()[-1])["rows"]}
    assert list(rows) == [(b, m) for b in ("blip", "meter") for m in ("none", "elip-lookahead", "elip-reuse")]
    # ViT-B/16 at 224: 197 tokens; ELIP keeps 176/127/78 patches (+ [CLS] + fused) before layers 2/4/10
    assert rows["blip", "none"]["token_layers"] == 197 * 12
    assert rows["blip", "elip-reuse"]["token_layers"] == 2 * 197 + 2 * 178 + 6 * 129 + 2 * 80
    # CLIP ViT-B/32 at 224, 11 layers: 50 tokens; ELIP keeps 44/34/22 before layers 2/4/9
    assert rows["meter", "none"]["token_layers"] == 50 * 11
    assert rows["meter", "elip-lookahead"]["token_layers"] == 2 * 50 + 2 * 46 + 5 * 36 + 2 * 24
    # the paper's BLIP ratios (9.34/11.03 TFLOPs, 74.7/90.8 GB) bound the official look-ahead
    assert rows["blip", "elip-lookahead"]["flops_ratio"] <= 0.847
    assert rows["blip", "elip-lookahead"]["activation_bytes_ratio"] <= 0.823
    assert rows["blip", "elip-reuse"]["flops_ratio"] <= 0.80
    # METER: the paper's memory ratio (70.4/90.0 GB); its 6.43/8.66 TFLOPs ratio is out of the
    # look-ahead's reach (README), the look-ahead-free variant stays under 0.80
    assert rows["meter", "elip-lookahead"]["activation_bytes_ratio"] <= 0.782
    assert rows["meter", "elip-reuse"]["flops_ratio"] <= 0.80
    assert rows["blip", "none"]["tflops_at_36"] == pytest.approx(rows["blip", "none"]["flops"] * 18 / 1e12)
