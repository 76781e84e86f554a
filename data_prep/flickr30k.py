"""Flickr30k for retrieval evaluation: Karpathy's ``dataset_flickr30k.json`` or the ALBEF/BLIP
``flickr30k_{train,val,test}.json`` lists, with local images."""
from . import local
from .annotations import describe, load_json, parse_image_caption_list, parse_karpathy, require_dir, split_of_filename
from .errors import DataPrepError

NAME = "flickr30k"
HELP = "Flickr30k Karpathy split (evaluation: 5 captions per image kept together)"
EXPECTED = ("Flickr30k annotations: Karpathy's dataset_flickr30k.json {'images': [{'filename', 'sentences', "
            "'split'}]} or the ALBEF/BLIP list [{'image': ..., 'caption': str or [str]}]")
SUBDIRS = ("flickr30k-images",)
# Flickr30k images are distributed only after a request form: there is no --download.


def add_arguments(parser) -> None:
    local.add_image_arguments(parser, "dataset_flickr30k.json or flickr30k_test.json")
    parser.add_argument("--split", choices=("train", "val", "test", "all"),
                        help="Karpathy split (default test; for ALBEF/BLIP lists: from the file name)")


def run(args) -> dict:
    if not args.annotations or not args.images:
        raise DataPrepError("flickr30k needs --annotations FILE and --images DIR")
    images_dir = require_dir(args.images, "the Flickr30k image directory (flickr30k-images/)")
    data = load_json(args.annotations, EXPECTED)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        split = args.split or "test"
        parsed = parse_karpathy(data, images_dir, split, args.max_words, SUBDIRS)
    elif isinstance(data, list):
        split = args.split or split_of_filename(args.annotations, "test")
        parsed = parse_image_caption_list(data, images_dir, split, args.max_words, SUBDIRS)
    else:
        raise DataPrepError(f"{args.annotations}: expected {EXPECTED}; found {describe(data)}")
    return local.build(args, NAME, parsed, split, [args.annotations])
