"""GQA: a balanced questions JSON with local images.

Input, as published (cs.stanford.edu/people/dorarad/gqa): ``{train,val,testdev,test}_balanced_questions.json``,
an object ``{question_id: {"imageId", "question", "answer", "fullAnswer", "types": {"structural",
"semantic", "detailed"}, "isBalanced", ...}}``; the test questions have no ``answer``. Image
``imageId`` is ``--images/{imageId}.jpg`` (the ``images/`` folder of ``images.zip``).

One sample per question: ``KEY.jpg``, ``KEY.txt`` = the question, ``KEY.json`` = ``{"task": "vqa",
"dataset": "gqa", "question_id" (str, as in the file), "question", "answers": [the one answer]
(``[]`` without one), "answer_type": types.structural, "question_type": types.detailed,
"full_answer", "image_id", "source", "split", "original_size", "size"}``. GQA is scored by exact
match (:func:`pipeline.eval.vqa_metric.exact_match`). Bad rows (missing image, empty question,
no ``imageId``) are skipped and counted; a malformed file is a one-line error naming it.
"""
import re
from pathlib import Path

from . import tasks
from .annotations import Parsed, describe, image_candidates, load_json, require_dir
from .errors import DataPrepError
from .reasons import BAD_ROW, EMPTY_TEXT

NAME = "gqa"
HELP = "GQA balanced questions JSON with local images"
EXPECTED = "GQA questions JSON {question_id: {'imageId', 'question', 'answer', 'types', ...}}"
SPLIT_OF_NAME = re.compile(r"^(train|val|testdev|test|challenge|submission)")


def parse(path, images_dir: Path, max_words: int) -> Parsed:
    """One row per question, in the file's order."""
    data = load_json(path, EXPECTED)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in list(data.values())[:10]):
        raise DataPrepError(f"{path}: expected {EXPECTED}; found {describe(data)}")
    out = Parsed()
    for qid, q in data.items():
        if not isinstance(q, dict) or not isinstance(q.get("imageId"), str) or not q["imageId"]:
            out.fail(BAD_ROW, f"question {qid}: expected {{'imageId': str, 'question', ...}}, got {str(q)[:80]}")
            continue
        question = tasks.clean_text(q.get("question"), max_words)
        if not question:
            out.fail(EMPTY_TEXT, f"question {qid}")
            continue
        answer = q.get("answer")
        types = q.get("types") if isinstance(q.get("types"), dict) else {}
        meta = {"task": "vqa", "dataset": "gqa", "question_id": qid, "question": question,
                "answers": [answer] if isinstance(answer, str) else [],
                "answer_type": types.get("structural"), "question_type": types.get("detailed"),
                "full_answer": q.get("fullAnswer"), "image_id": q["imageId"]}
        paths = image_candidates(images_dir, f"{q['imageId']}.jpg", ("images",))
        out.rows.append(tasks.TaskRow((("jpg", paths),), question, meta, answer if isinstance(answer, str) else None))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--questions", required=True, metavar="FILE",
                        help="balanced questions JSON (testdev_balanced_questions.json, ...)")
    parser.add_argument("--images", required=True, metavar="DIR", help="GQA image directory ({imageId}.jpg)")
    parser.add_argument("--split", help="split name (default: from the file name: train, val, testdev, test)")


def run(args) -> dict:
    images_dir = require_dir(args.images, "the GQA image directory ({imageId}.jpg)")
    parsed = parse(args.questions, images_dir, args.max_words)
    match = SPLIT_OF_NAME.match(Path(args.questions).name)
    split = args.split or (match[1] if match else "train")
    return tasks.build(args, NAME, "vqa", parsed, split, [args.questions])
