"""VQAv2: the official questions + annotations JSON pair with local COCO images.

Inputs, as published (visualqa.org): ``v2_OpenEnded_mscoco_{train2014,val2014}_questions.json``
``{"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}]}`` and
``v2_mscoco_{train2014,val2014}_annotations.json`` ``{"annotations": [{"question_id", "image_id",
"question_type", "answer_type", "multiple_choice_answer", "answers": [{"answer",
"answer_confidence", "answer_id"}]}]}``. Test-dev / test questions have no annotations: leave out
``--annotations`` and every sample gets ``answers: []``. Image ``image_id`` of subtype ``S`` is
``--images/S/COCO_S_{image_id:012d}.jpg`` (test-dev2015's images are test2015's).

One sample per question: ``KEY.jpg``, ``KEY.txt`` = the question, ``KEY.json`` = ``{"task": "vqa",
"dataset": "vqav2", "question_id", "question", "answers": [the 10 human answers as given],
"answer_type", "question_type", "image_id", "source", "split", "original_size", "size"}``.
Bad rows (missing image, empty question, a question without annotation while annotations are
given) are skipped and counted; a malformed file is a one-line error naming it.
"""
from pathlib import Path

from . import tasks
from .annotations import Parsed, describe, image_candidates, load_json, require_dir
from .errors import DataPrepError
from .reasons import BAD_ROW, EMPTY_TEXT

NAME = "vqav2"
HELP = "VQAv2 questions + annotations (official JSON pair) with local COCO images"
DATASET = "vqav2"
EXPECTED_Q = "VQA questions JSON {'data_subtype', 'questions': [{'image_id', 'question', 'question_id'}]}"
EXPECTED_A = "VQA annotations JSON {'annotations': [{'question_id', 'answers': [{'answer'}], 'answer_type', ...}]}"
SPLITS = {"train2014": "train", "val2014": "val", "test2015": "test", "test-dev2015": "testdev"}


def coco_image(images_dir: Path, subtype: str, image_id) -> tuple:
    """Candidate paths of COCO image ``image_id`` of ``subtype`` (``val2014``, ``test-dev2015``, ...)."""
    folder = "test2015" if subtype == "test-dev2015" else subtype
    name = f"COCO_{folder}_{int(image_id):012d}.jpg"
    # COCO 2017 folders name images by id alone
    by_id = str(images_dir / f"{int(image_id):012d}.jpg")
    return image_candidates(images_dir, f"{folder}/{name}", (folder,)) + (by_id,)


def _answers(ann: dict) -> list | None:
    answers = ann.get("answers")
    if not isinstance(answers, list):
        return None
    out = [a.get("answer") if isinstance(a, dict) else None for a in answers]
    return out if all(isinstance(a, str) for a in out) else None


def parse(questions_path, annotations_path, images_dir: Path, dataset: str, max_words: int) -> tuple[Parsed, str]:
    """Rows of the questions file (with their annotations when given) and the split they form."""
    qdata = load_json(questions_path, EXPECTED_Q)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise DataPrepError(f"{questions_path}: expected {EXPECTED_Q}; found {describe(qdata)}")
    subtype = str(qdata.get("data_subtype") or "")
    anns = None
    if annotations_path:
        adata = load_json(annotations_path, EXPECTED_A)
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise DataPrepError(f"{annotations_path}: expected {EXPECTED_A}; found {describe(adata)}")
        anns = {a["question_id"]: a for a in adata["annotations"] if isinstance(a, dict) and "question_id" in a}
        subtype = subtype or str(adata.get("data_subtype") or "")
    if subtype not in SPLITS:
        raise DataPrepError(f"{questions_path}: 'data_subtype' is {subtype!r}; expected one of {', '.join(SPLITS)}")
    out = Parsed()
    for n, q in enumerate(qdata["questions"]):
        if not isinstance(q, dict) or "question_id" not in q or "image_id" not in q:
            out.fail(BAD_ROW, f"questions[{n}]: expected {{'image_id', 'question', 'question_id'}}, got {str(q)[:80]}")
            continue
        question = tasks.clean_text(q.get("question"), max_words)
        if not question:
            out.fail(EMPTY_TEXT, f"questions[{n}]: question_id {q['question_id']}")
            continue
        answers, answer_type, question_type, target = [], None, None, None
        if anns is not None:
            ann = anns.get(q["question_id"])
            answers = _answers(ann) if ann else None
            if not answers:
                out.fail(BAD_ROW, f"questions[{n}]: question_id {q['question_id']} has no annotation with answers")
                continue
            answer_type, question_type = ann.get("answer_type"), ann.get("question_type")
            target = ann.get("multiple_choice_answer") or max(set(answers), key=answers.count)
        try:
            paths = coco_image(images_dir, subtype, q["image_id"])
        except (TypeError, ValueError):
            out.fail(BAD_ROW, f"questions[{n}]: image_id {q['image_id']!r} is not a number")
            continue
        meta = {"task": "vqa", "dataset": dataset, "question_id": q["question_id"], "question": question,
                "answers": answers, "answer_type": answer_type, "question_type": question_type,
                "image_id": q["image_id"]}
        out.rows.append(tasks.TaskRow((("jpg", paths),), question, meta, target))
    return out, SPLITS[subtype]


def add_arguments(parser, questions_example="v2_OpenEnded_mscoco_val2014_questions.json",
                  annotations_example="v2_mscoco_val2014_annotations.json") -> None:
    parser.add_argument("--questions", required=True, metavar="FILE", help=f"questions JSON ({questions_example})")
    parser.add_argument("--annotations", metavar="FILE",
                        help=f"annotations JSON ({annotations_example}); leave out for test-dev / test questions")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="COCO image root holding train2014/, val2014/, test2015/")


def run(args, dataset: str = DATASET, name: str = NAME) -> dict:
    images_dir = require_dir(args.images, "the COCO image directory (holding train2014/, val2014/, test2015/)")
    parsed, split = parse(args.questions, args.annotations, images_dir, dataset, args.max_words)
    inputs = [args.questions] + ([args.annotations] if args.annotations else [])
    return tasks.build(args, name, "vqa", parsed, split, inputs)
