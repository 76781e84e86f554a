"""`python -m pipeline.bench data`: our loader next to open_clip's and the training step."""
import json
import subprocess
import sys


def test_data_bench_compares_with_open_clip_and_the_training_step():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "data", "--sizes", "96", "200x150", "--workers", "1",
         "--num", "64", "--batch", "16", "--rounds", "1", "--repeats", "1", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    loader_rows = rows[:-1]
    assert [(r["image"], r["setting"], r["method"]) for r in loader_rows] == [
        (image, setting, method) for image in ("96x96", "200x150") for setting, method in (
            ("like for like", "ours"), ("like for like", "open_clip"), ("tiny_albef_elip transforms (64 px)", "ours"))]
    assert all(r["samples_per_s"] > 0 and r["workers"] == 1 and r["jpeg_kib"] > 0 for r in loader_rows)
    ours, theirs = loader_rows[0], loader_rows[1]
    assert theirs["ratio"] == 1.0 and ours["ratio"] > 0
    assert rows[-1]["setting"] == "training step" and rows[-1]["method"].startswith("tiny_albef_elip, batch 32, 1 ")
    assert "give each rank data.workers >=" in proc.stdout


def test_data_bench_names_the_missing_open_clip():
    code = ("import sys; sys.modules['open_clip'] = None\n"
            "from pipeline.bench import main\nmain(['data'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "open_clip is needed" in proc.stderr and "pip install 'elip-pipeline[bench]'" in proc.stderr
