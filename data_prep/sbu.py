"""SBU Captioned Photos: the release's two parallel text files (URLs, captions) or a json
(``[{"url"|"image_urls", "caption"|"captions"}]``, or the same as parallel lists)."""
from pathlib import Path

from . import download, urls
from .annotations import Parsed, describe, load_json
from .errors import DataPrepError

NAME = "sbu"
HELP = "SBU Captions: URL + caption text files or sbu.json, images fetched with img2dataset"
EXPECTED = ("SBU json: a list [{'url' or 'image_urls': str, 'caption' or 'captions': str or [str]}] "
            "or parallel lists {'image_urls': [...], 'captions': [...]}")
URL_KEYS, CAPTION_KEYS = ("url", "image_urls", "image_url", "image"), ("caption", "captions")
# URL and md5 as in torchvision.datasets.SBU
DOWNLOAD = download.Remote("https://www.cs.rice.edu/~vo9/sbucaptions/SBUCaptionedPhotoDataset.tar.gz",
                           md5="9aec147b3488753cf758b4d493422285", extract=True)
RELEASE_URLS = "dataset/SBU_captioned_photo_dataset_urls.txt"
RELEASE_CAPTIONS = "dataset/SBU_captioned_photo_dataset_captions.txt"


def _photo_id(url: str, fallback: int) -> str:
    # SBU URLs are Flickr static URLs: .../2723/4385058960_b0f291553e.jpg -> 4385058960
    stem = url.rstrip("/").rsplit("/", 1)[-1].split(".")[0].split("_")[0]
    return stem if stem.isdigit() else str(fallback)


def parse_text(urls_file, captions_file, max_words: int) -> Parsed:
    """The release's ``SBU_captioned_photo_dataset_{urls,captions}.txt``, line by line."""
    url_lines = urls.read_lines(urls_file, "one image URL per line (SBU_captioned_photo_dataset_urls.txt)")
    cap_lines = urls.read_lines(captions_file, "one caption per line (SBU_captioned_photo_dataset_captions.txt)")
    if len(url_lines) != len(cap_lines):
        raise DataPrepError(f"{captions_file}: expected one caption per URL line of {urls_file}, "
                            f"found {len(cap_lines)} captions for {len(url_lines)} URLs")
    out = Parsed()
    for n, (url, cap) in enumerate(zip(url_lines, cap_lines)):
        urls.add_row(out, f"line {n + 1}", url, cap, _photo_id(url.strip(), n), max_words)
    return out


def parse_json(path, max_words: int) -> Parsed:
    data = load_json(path, EXPECTED)
    if isinstance(data, dict):  # parallel lists, as in sbu-captions-all.json
        ukey = next((k for k in URL_KEYS if isinstance(data.get(k), list)), None)
        ckey = next((k for k in CAPTION_KEYS if isinstance(data.get(k), list)), None)
        if ukey is None or ckey is None or len(data[ukey]) != len(data[ckey]):
            raise DataPrepError(f"{path}: expected {EXPECTED}; found {describe(data)}")
        data = [{"url": u, "caption": c} for u, c in zip(data[ukey], data[ckey])]
    if not isinstance(data, list):
        raise DataPrepError(f"{path}: expected {EXPECTED}; found {describe(data)}")
    out = Parsed()
    for n, entry in enumerate(data):
        entry = entry if isinstance(entry, dict) else {}
        url = next((entry[k] for k in URL_KEYS if k in entry), None)
        if isinstance(url, list):  # some dumps hold one-element lists
            url = url[0] if url else None
        cap = next((entry[k] for k in CAPTION_KEYS if k in entry), None)
        image_id = entry.get("image_id", entry.get("id", _photo_id(url, n) if isinstance(url, str) else n))
        urls.add_row(out, f"entry {n}", url, cap, image_id, max_words)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--urls", metavar="FILE", help="SBU_captioned_photo_dataset_urls.txt")
    parser.add_argument("--captions", metavar="FILE", help="SBU_captioned_photo_dataset_captions.txt")
    parser.add_argument("--annotations", metavar="FILE", help="sbu.json instead of the two text files")
    urls.add_arguments(parser)
    download.add_arguments(parser)


def run(args) -> dict:
    if args.download and not args.annotations:
        cache = download.fetch_all([DOWNLOAD], download.cache_dir_of(args), args.mirror, not args.no_progress)
        args.urls = args.urls or str(cache / RELEASE_URLS)
        args.captions = args.captions or str(cache / RELEASE_CAPTIONS)
    if args.annotations:
        parsed, inputs = parse_json(args.annotations, args.max_words), [args.annotations]
    elif args.urls and args.captions:
        parsed, inputs = parse_text(args.urls, args.captions, args.max_words), [args.urls, args.captions]
    else:
        raise DataPrepError("sbu needs --urls FILE --captions FILE, or --annotations sbu.json, or --download")
    return urls.build(args, NAME, parsed, "train", [str(Path(p)) for p in inputs])
