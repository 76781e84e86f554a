"""`python -m pipeline.bench step --backbone albef`: JSON rows and the deterministic targets
(FLOPs and saved activations of one full paper-size ALBEF step; wall time is not asserted)."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_albef_step_bench_meets_flops_and_activation_targets():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "step", "--backbone", "albef", "--json", "--batch", "2",
         "--repeats", "1", "--methods", "none,elip-lookahead,elip-reuse,tome,evit"],  # flip, adaptive: bench tokens
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["rows"]}
    assert list(rows) == ["none", "elip-lookahead", "elip-reuse", "tome", "evit"]
    assert rows["none"]["token_layers"] == 257 * 12
    assert rows["elip-reuse"]["token_layers"] == 2 * 257 + 2 * 232 + 6 * 168 + 2 * 104
    # the paper's ALBEF ratios (8.50/9.65 TFLOPs, 69.6/88.1 GB) bound the official look-ahead
    assert rows["elip-lookahead"]["flops_ratio"] <= 0.881
    assert rows["elip-lookahead"]["activation_bytes_ratio"] <= 0.790
    assert rows["elip-reuse"]["flops_ratio"] <= 0.80
    assert rows["elip-reuse"]["activation_bytes_ratio"] <= 0.78
    assert "MISSED" not in proc.stdout
