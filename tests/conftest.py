"""Suite-wide rules: a skipped test fails the run (a missing package is a broken install,
not a pass), and every test runs on CPU with DeepSpeed's CPU accelerator."""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped)} skipped test(s) count as failures: " + ", ".join(_skipped), red=True
        )


@pytest.fixture(scope="session")
def clip_warm_start(tmp_path_factory):
    """The demo's recipe in small, made once per session for every test that starts from it
    (tests/test_albef_learns.py, tests/test_finetune_learns.py): 2000 synthetic training images
    with 5 captions each (``captions_train``), 100 held-out ones (``captions_test``) and a tiny
    CLIP trained 300 steps on them (``warm``; in-batch ITC leaves ln 32 after some 150 steps).
    Returns the directory holding the three."""
    from data_prep import synthetic
    from tests.helpers_train import train_subprocess

    root = tmp_path_factory.mktemp("clip_warm_start")
    synthetic.build(root / "captions_train", num=2000, image_size=64, shard_size=500, min_shards=1,
                    captions_per_image=5)
    synthetic.build(root / "captions_test", num=100, image_size=64, shard_size=100, split="test",
                    captions_per_image=5, min_shards=1)
    train_subprocess("tiny_clip", root / "warm", root / "captions_train", root / "captions_test", "optim.max_steps=300")
    return root
