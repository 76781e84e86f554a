"""The img2dataset call of the URL sources (imported only when images are downloaded:
img2dataset pulls in OpenCV, albumentations, pandas and, through webdataset, torch)."""
import importlib
import os
import signal
from contextlib import contextmanager
from pathlib import Path

# albumentations (imported by img2dataset) otherwise asks PyPI for a newer version at import;
# set before the import, and inherited by img2dataset's spawned workers.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import img2dataset  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402

from .images import open_checked  # noqa: E402
from .reasons import Skip  # noqa: E402

OOM_SHARD_COUNT = 5  # img2dataset's shard names: 00000.tar, 00000.parquet, 00000_stats.json


class CheckingResizer(Resizer):
    """img2dataset's resizer, after a full PIL decode that names what is wrong with a bad image.

    OpenCV reports a truncated JPEG and an HTML page alike ("Image decoding error"), but the
    manifest counts them separately; the error string starts with our reason
    (``reasons.classify_download_error`` reads it back).
    """

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            open_checked(img_stream.getvalue())
        except Skip as skip:
            return None, None, None, None, None, f"{skip.reason}: {skip.detail}"
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


@contextmanager
def _checking_resizer():
    # img2dataset.download() builds its Resizer itself and offers no hook for validation, so
    # the name it looks up is swapped for the duration of the call. (The package re-exports
    # a function called ``main``, hence import_module for the module of that name.)
    i2d_main = importlib.import_module("img2dataset.main")
    saved = i2d_main.Resizer
    i2d_main.Resizer = CheckingResizer
    try:
        yield
    finally:
        i2d_main.Resizer = saved


def run_img2dataset(url_list: Path, stage: Path, options: dict) -> None:
    """Download the parquet ``url_list`` (columns url, caption, captions, image_id, extra) into
    img2dataset webdataset shards under ``stage``, resuming shards already finished there.
    ``options``: image_size, resize_mode, processes_count, thread_count, ... of img2dataset."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        with _checking_resizer():
            img2dataset.download(
                url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
                save_additional_columns=["captions", "image_id", "extra"], output_format="webdataset",
                output_folder=str(stage), incremental_mode="incremental", extract_exif=False,
                compute_hash=None, enable_wandb=False, oom_shard_count=OOM_SHARD_COUNT,
                distributor="multiprocessing", **options)
    except SystemExit:
        # img2dataset's SIGINT handler exits with status 0; a Ctrl-C must not look like success
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous)  # img2dataset replaced it for the whole process
