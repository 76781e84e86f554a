"""Conceptual Captions 3M: the release's header-less ``caption<TAB>url`` TSV files."""
from . import download, urls
from .annotations import Parsed
from .errors import DataPrepError

NAME = "cc3m"
HELP = "Conceptual Captions 3M TSV (caption<TAB>url), images fetched with img2dataset"
EXPECTED = "a header-less TSV with lines 'caption<TAB>url' (Train_GCC-training.tsv)"
# Google publishes no checksums for these files.
DOWNLOADS = {"train": download.Remote("https://storage.googleapis.com/gcc-data/Train/GCC-training.tsv"),
             "val": download.Remote("https://storage.googleapis.com/gcc-data/Validation/GCC-1.1.0-Validation.tsv")}


def parse(path, max_words: int) -> Parsed:
    """One row per line; a line without exactly one tab is a bad row, not a fatal error."""
    out = Parsed()
    lines = urls.read_lines(path, EXPECTED)
    for n, line in enumerate(lines):
        fields = line.split("\t")
        if len(fields) != 2:
            if line.strip():
                out.fail("bad row", f"line {n + 1}: expected 'caption<TAB>url', got {line[:100]!r}")
            continue
        urls.add_row(out, f"line {n + 1}", fields[1], fields[0], n, max_words)
    if lines and not out.rows and out.failures.get("bad row", 0) == sum(1 for x in lines if x.strip()):
        raise DataPrepError(f"{path}: expected {EXPECTED}; no line has that form")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--tsv", metavar="FILE", help="Train_GCC-training.tsv or Validation_GCC-1.1.0-Validation.tsv")
    parser.add_argument("--split", choices=("train", "val"),
                        help="which release file (default: from the file name, else train)")
    urls.add_arguments(parser)
    download.add_arguments(parser)


def run(args) -> dict:
    split = args.split or ("val" if args.tsv and "valid" in args.tsv.lower() else "train")
    if args.download and not args.tsv:
        cache = download.fetch_all([DOWNLOADS[split]], download.cache_dir_of(args), args.mirror,
                                   not args.no_progress)
        args.tsv = str(cache / DOWNLOADS[split].filename)
    if not args.tsv:
        raise DataPrepError("cc3m needs --tsv FILE (or --download)")
    return urls.build(args, NAME, parse(args.tsv, args.max_words), split, [args.tsv])
