"""`python -m pipeline.bench data`: loader throughput rows next to the training step's."""
import json
import subprocess
import sys


def test_data_bench_reports_loader_and_step_throughput():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "data", "--num", "256", "--repeats", "1", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert [r["method"] for r in rows][:2] == ["loader, 1 worker", "loader, 2 workers"]
    assert rows[2]["method"].startswith("training step (tiny_albef_elip, batch 32")
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert "with 2 workers the loader" in proc.stdout
