"""OK-VQA: the official questions + annotations JSON pair (VQAv2's format) with local COCO images.

Inputs (okvqa.allenai.org): ``OpenEnded_mscoco_{train2014,val2014}_questions.json`` and
``mscoco_{train2014,val2014}_annotations.json``; each annotation's ``answers`` hold ten
``{"answer", "raw_answer", "answer_confidence", "answer_id"}``. The shards keep ``answer`` (what
the OK-VQA evaluation scores against). Images, sample schema and bad-row counting are VQAv2's
(:mod:`data_prep.vqav2`), with ``"dataset": "okvqa"``.
"""
from . import vqav2

NAME = "okvqa"
HELP = "OK-VQA questions + annotations (official JSON pair) with local COCO images"


def add_arguments(parser) -> None:
    vqav2.add_arguments(parser, "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json")


def run(args) -> dict:
    return vqav2.run(args, dataset="okvqa", name=NAME)
