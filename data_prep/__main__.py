"""Command line: ``python -m data_prep SOURCE [options] --out DIR`` and ``... report DIR``."""
import argparse
import sys

from . import (captions, cc3m, coco, flickr30k, gqa, images, nlvr2, nocaps, okvqa, report, sbu, snli_ve,
               synthetic, synthetic_tasks, vg, video, vqav2, writer)
from .errors import DataPrepError

SOURCES = (coco, vg, sbu, cc3m, flickr30k, synthetic, video, vqav2, okvqa, gqa, nlvr2, snli_ve, nocaps,
           *synthetic_tasks.SOURCES)


def _part(text: str) -> writer.Part:
    """``--part I/N`` -> :class:`writer.Part` (argparse reports the message as a usage error)."""
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()) or not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (task I of N), got {text!r}")
    return writer.Part(int(index), int(count))


def _common(parser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory (shards, manifest.json, sizes.json)")
    g.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    g.add_argument("--prefix", help="shard name prefix (default: the source, plus the split for eval sets)")
    g.add_argument("--min-shards", type=int, default=64,
                   help="warn when there are fewer shards than this many data-loader readers "
                        "(default 64 = 2 nodes x 8 GPUs x 4 workers)")
    g.add_argument("--overwrite", action="store_true", help="delete this prefix's shards and start again")
    g.add_argument("--workers", type=int, default=None,
                   help="processes writing shards (default: CPU count for local image files; "
                        "synthetic: 1 below 20000 images, where starting processes costs more than it saves)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--part", type=_part, default=writer.Part(), metavar="I/N",
                   help="write only shards I, I+N, I+2N, ... (task I of N, counted from 0, e.g. one task of "
                        "a SLURM job array: launch/slurm/data_prep.sbatch); the N tasks together write every "
                        "shard once and the last to finish writes manifest.json")
    g = parser.add_argument_group("captions and images")
    g.add_argument("--max-words", type=int, default=captions.DEFAULT_MAX_WORDS,
                   help=f"cut captions to this many words (default {captions.DEFAULT_MAX_WORDS}; 0 keeps all)")
    if "--image-size" in parser._option_string_actions:
        return  # a source that draws its images (synthetic) has its own size option
    g.add_argument("--image-size", type=int, default=384,
                   help="resize target in px (default 384; 0 keeps the original size)")
    g.add_argument("--resize-mode", choices=images.RESIZE_MODES, default="keep_ratio",
                   help="keep_ratio: shorter side = size; center_crop; border: pad to a square; no "
                        "(never upscales; default keep_ratio)")
    g.add_argument("--min-image-size", type=int, default=0, help="skip images whose shorter side is smaller")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Build webdataset shards (KEY.jpg, KEY.txt, KEY.json) with manifest.json and sizes.json. "
                    "Re-running a killed command resumes it.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SOURCE")
    for module in SOURCES:
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        _common(p)
        p.set_defaults(run=module.run)
    p = sub.add_parser("report", help="print counts and top errors of an output directory",
                       description=report.__doc__)
    report.add_arguments(p)
    p.set_defaults(run=report.run)
    return parser


def main(argv=None) -> int:
    """Entry point of ``python -m data_prep`` and the ``elip-data-prep`` console script.

    Returns the exit status: 0 on success, 2 on a usage or input error (one line on stderr,
    no traceback), 1 when work is left undone (img2dataset failures, I/O errors such as a full
    disk), 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "download", False) and not getattr(args, "part", writer.Part()).whole:
            raise DataPrepError("--download cannot be combined with --part: the tasks would fetch the same files "
                                "at once; download the inputs first, then give them to the tasks "
                                "(--tsv / --urls / --annotations / --images)")
        args.run(args)
    except DataPrepError as err:
        print(f"data_prep: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        # disk full, permissions, a vanished mount: environmental, and the shards done so far are safe
        print(f"data_prep: error: {err}; completed shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("data_prep: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
