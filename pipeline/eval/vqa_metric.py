"""VQA accuracy as the official VQAv2 evaluation (``vqaEval.py``) computes it; pure functions.

- :func:`normalize_answer` is the official answer normalisation: newlines and tabs become
  spaces; punctuation is deleted next to a space (or anywhere when the text holds a
  comma between digits, "1,000") and turned into a space elsewhere; periods not followed by
  a digit are dropped; lower case; number words ``none``/``zero`` .. ``ten`` become digits;
  the articles ``a an the`` go; apostrophe-less contractions get theirs back (``dont`` ->
  ``don't``).
- :func:`vqa_accuracy` is VQAv2's (and OK-VQA's) per-question score: for each of the human
  answers, ``min(#matches among the *other* answers / 3, 1)``, averaged over these
  leave-one-out subsets (10 choose 9 for VQAv2's ten answers).
- :func:`exact_match` is GQA's: the normalised prediction equals the normalised answer.
- :func:`score` averages per-question scores overall and per answer type, x100.

One deliberate difference: the official script normalises the *human* answers by
punctuation only, and only when they disagree, because the published annotation files store
them already normalised (digits, no articles). Here they get the full normalisation, which
leaves such answers unchanged, so raw answers ("Two", the synthetic sets', OK-VQA's
``raw_answer``) score as their normalised form would.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

# The official lists (vqaEval.py), kept verbatim so scores match the evaluation server.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
# "(?!<=\d)" is the official pattern's (mistyped) look-behind: as written it is a look-ahead that
# never fails before a ".", so only "a period not followed by a digit" counts; kept for equal scores.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each mark is deleted when it touches a space somewhere
    in ``text`` (or ``text`` has a digit-comma-digit), else replaced by a space; then periods that
    do not precede a digit are deleted."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, articles dropped,
    contractions restored, words re-joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer as the official evaluation compares it: ``"Two dogs."`` -> ``"2 dogs"``."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 / OK-VQA accuracy of one prediction in [0, 1].

    ``answers``: the human answers (ten in VQAv2), raw. For each answer left out, the prediction
    scores ``min(n / 3, 1)`` with ``n`` the matches among the remaining ones; the result is the
    mean over the leave-one-out subsets (so 3 matching answers of 10 give 0.9, 4 or more 1.0).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def exact_match(prediction: str, answer: str) -> float:
    """GQA accuracy of one prediction: 1.0 when it equals ``answer`` after normalisation, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def question_score(prediction: str, answers: Sequence[str], dataset: str = "vqav2") -> float:
    """One question's score in [0, 1] under its dataset's rule (``gqa``: exact match with the one
    answer; ``vqav2``, ``okvqa`` and the synthetic set: :func:`vqa_accuracy`)."""
    if dataset == "gqa":
        if len(answers) != 1:
            raise ValueError(f"a GQA question has one answer, got {len(answers)}: {list(answers)[:3]}")
        return exact_match(prediction, answers[0])
    return vqa_accuracy(prediction, answers)


def score(predictions: Mapping, questions: Mapping[object, Mapping], dataset: str = "vqav2") -> dict:
    """Score ``predictions`` (question id -> answer) on ``questions`` (question id ->
    ``{"answers": [...], "answer_type": str | None}``), every question once.

    Returns ``{"overall": float, "per_answer_type": {type: float}, "num_questions": int}``, the
    accuracies x100 (answer types that are ``None`` are left out of the breakdown). A question
    without a prediction, or a prediction for an unknown question, is a ``ValueError`` naming them.
    """
    missing = [q for q in questions if q not in predictions]
    unknown = [q for q in predictions if q not in questions]
    if missing:
        raise ValueError(f"no answer for {len(missing)} of {len(questions)} questions: {_ids(missing)}")
    if unknown:
        raise ValueError(f"answers for {len(unknown)} questions not in the annotations: {_ids(unknown)}")
    if not questions:
        raise ValueError("no questions to score")
    by_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for qid, q in questions.items():
        s = question_score(predictions[qid], q["answers"], dataset)
        scores.append(s)
        if q.get("answer_type") is not None:
            by_type[q["answer_type"]].append(s)
    return {"overall": 100 * sum(scores) / len(scores),
            "per_answer_type": {t: 100 * sum(v) / len(v) for t, v in sorted(by_type.items())},
            "num_questions": len(scores)}


def _ids(ids: Iterable, limit: int = 5) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
