"""Tiny downstream inputs in the published formats (VQAv2 / OK-VQA, GQA, NLVR2, SNLI-VE, NoCaps),
each with a few bad rows, written under a directory. Each builder returns the paths it wrote."""
import io
import json
from pathlib import Path

from PIL import Image

from . import HTML, jpeg


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def png(width=30, height=20, colour=(0, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def _answers(words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def vqa(root: Path, okvqa: bool = False) -> dict:
    """COCO images (val2014: 1, 2, 4; 3 missing; 5 is an HTML page; test2015: 7) and a val
    question/annotation pair: questions 10, 11 (image 1), 20 (image 2), 30 (image 3: missing),
    40 (empty question), 50 (no annotation), 60 (image 5: not an image), plus test-dev questions."""
    images = root / "coco"
    for i in (1, 2, 4):
        _write(images / "val2014" / f"COCO_val2014_{i:012d}.jpg", jpeg(40 + i, 30))
    _write(images / "val2014" / "COCO_val2014_000000000005.jpg", HTML)
    _write(images / "test2015" / "COCO_test2015_000000000007.jpg", jpeg(33, 22))
    prefix = "" if okvqa else "v2_"
    qs = [(10, 1, "How many dogs are there?"), (11, 1, "Is it  sunny?"), (20, 2, "What colour is the bus?"),
          (30, 3, "Where is this?"), (40, 4, "   "), (50, 4, "What is unannotated?"), (60, 5, "What is it?")]
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                 "data_subtype": "val2014",
                 "questions": [{"image_id": im, "question": q, "question_id": qid} for qid, im, q in qs]}
    answers = {10: ["2"] * 6 + ["3"] * 4, 11: ["yes"] * 9 + ["no"], 20: ["red"] * 5 + ["Red bus"] * 5,
               30: ["beach"] * 10, 40: ["x"] * 10, 60: ["cat"] * 10}
    types = {10: ("how many", "number"), 11: ("is it", "yes/no")}
    anns = []
    for qid, words in answers.items():
        qtype, atype = types.get(qid, ("what color is the", "other"))
        entry = {"question_id": qid, "image_id": dict((q, im) for q, im, _ in qs)[qid], "question_type": qtype,
                 "answer_type": atype, "multiple_choice_answer": words[0], "answers": _answers(words)}
        if okvqa:
            for a in entry["answers"]:
                a["raw_answer"] = a["answer"].upper()
        anns.append(entry)
    q = _write(root / f"{prefix}OpenEnded_mscoco_val2014_questions.json", questions)
    a = _write(root / f"{prefix}mscoco_val2014_annotations.json",
               {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": anns})
    testdev = _write(root / f"{prefix}OpenEnded_mscoco_test-dev2015_questions.json",
                     {"data_subtype": "test-dev2015",
                      "questions": [{"image_id": 7, "question": "What is on the table?", "question_id": 70}]})
    return {"images": images, "questions": q, "annotations": a, "testdev": testdev}


def gqa(root: Path) -> dict:
    """GQA images n1, n2 (n3 missing) and a testdev balanced file with one empty question and one
    entry without imageId, plus a test file without answers."""
    images = root / "gqa" / "images"
    _write(images / "n1.jpg", jpeg(30, 30))
    _write(images / "n2.jpg", jpeg(31, 30))
    types = {"structural": "query", "semantic": "attr", "detailed": "objColor"}
    q = {"201": {"imageId": "n1", "question": "What color is the cup?", "answer": "white",
                 "fullAnswer": "The cup is white.", "isBalanced": True, "types": types, "semantic": []},
         "202": {"imageId": "n2", "question": "Is the man to the left of the car?", "answer": "no",
                 "fullAnswer": "No, the man is to the right of the car.",
                 "types": {"structural": "verify", "semantic": "rel", "detailed": "relVerify"}},
         "203": {"imageId": "n3", "question": "Which side is the lamp on?", "answer": "left", "types": types},
         "204": {"imageId": "n1", "question": "", "answer": "white", "types": types},
         "205": {"question": "No image?", "answer": "yes"}}
    test = {"301": {"imageId": "n2", "question": "What is the car made of?", "isBalanced": True}}
    return {"images": root / "gqa", "questions": _write(root / "testdev_balanced_questions.json", q),
            "test": _write(root / "test_balanced_questions.json", test)}


def nlvr2(root: Path) -> dict:
    """NLVR2 dev pairs dev-0-0 (two sentences) and dev-1-0 (right image missing), a train pair in
    its directory, and bad lines: unknown label, empty sentence, no identifier, not JSON."""
    images = root / "nlvr2"
    for name in ("dev-0-0-img0.png", "dev-0-0-img1.png", "dev-1-0-img0.png"):
        _write(images / "dev" / name, png(30 + len(name), 20))
    for name in ("train-5-1-img0.png", "train-5-1-img1.png"):
        _write(images / "train" / "7" / name, png(25, 25))

    def line(ident, sentence, label, **kw):
        return json.dumps({"identifier": ident, "sentence": sentence, "label": label, "validation": {},
                           "left_url": f"http://x/{ident}/l.jpg", "right_url": f"http://x/{ident}/r.jpg",
                           "synset": "dog", "query": "dog", "writer": "w1", "evals": {}, **kw})
    dev = "\n".join([line("dev-0-0-0", "There are two dogs.", "True"),
                     line("dev-0-0-1", "The left image has a cat.", "False"),
                     line("dev-1-0-0", "One image shows a bird.", "True"),
                     line("dev-0-0-2", "Unsure.", "maybe"),
                     line("dev-0-0-3", "  ", "True"),
                     json.dumps({"sentence": "no identifier", "label": "True"}),
                     "{not json"]) + "\n"
    train = line("train-5-1-0", "Both images show a horse.", "True", directory=7) + "\n"
    return {"images": images, "dev": _write(root / "dev.json", dev), "train": _write(root / "train.json", train)}


def snli_ve(root: Path) -> dict:
    """Flickr30K images 100, 101 (102 missing) and a dev jsonl: the three labels, SNLI's "-",
    an empty hypothesis and a line without an image id."""
    images = root / "flickr30k-images"
    _write(images / "100.jpg", jpeg(30, 40))
    _write(images / "101.jpg", jpeg(32, 40))

    def line(image, hyp, label, pair):
        return json.dumps({"Flickr30K_ID": image, "Flikr30kID": f"{image}.jpg", "sentence1": "A man plays.",
                           "sentence2": hyp, "gold_label": label, "pairID": pair, "captionID": f"{image}.jpg#0",
                           "annotator_labels": [label]})
    lines = [line("100", "A man is playing.", "entailment", "p1"), line("100", "A man is sad.", "neutral", "p2"),
             line("101", "Nobody is there.", "contradiction", "p3"), line("102", "A dog runs.", "entailment", "p4"),
             line("101", "A person.", "-", "p5"), line("101", "", "neutral", "p6"),
             json.dumps({"sentence2": "no image", "gold_label": "neutral"})]
    return {"images": images, "annotations": _write(root / "snli_ve_dev.jsonl", "\n".join(lines) + "\n")}


def nocaps(root: Path, base_url: str = "http://127.0.0.1:9") -> dict:
    """NoCaps validation JSON for images a, b (served as /nocaps/a.jpg, b.jpg), c (no such file,
    404) and d (no captions); local copies of a and b under ``root/nocaps``. Returns the files to
    serve too."""
    served = {"/nocaps/a.jpg": jpeg(50, 40, (10, 200, 10)), "/nocaps/b.jpg": jpeg(52, 40, (200, 10, 10))}
    for path, data in served.items():
        _write(root / "nocaps" / Path(path).name, data)
    domains = {"a": "in-domain", "b": "out-domain", "c": "near-domain", "d": "in-domain"}
    images = [{"id": n, "open_images_id": f"oi{name}", "file_name": f"{name}.jpg", "height": 40, "width": 50,
               "coco_url": f"{base_url}/nocaps/{name}.jpg", "domain": domains[name], "license": 0,
               "date_captured": ""} for n, name in enumerate("abcd")]
    anns = [{"image_id": n, "id": 10 * n + k, "caption": f"Image {name}, caption {k}."}
            for n, name in enumerate("abc") for k in range(10)]
    data = {"licenses": [], "info": {}, "images": images, "annotations": anns}
    return {"images": root / "nocaps", "annotations": _write(root / "nocaps_val_4500_captions.json", data),
            "served": served}
