"""Caption cleaning as done by the ALBEF/BLIP data pipelines."""
import re

# ALBEF's pre_caption removes these characters outright (so "it's" -> "its") and BLIP
# turns . ! " ( ) * # : ; ~ into spaces; we follow ALBEF and also drop the other
# ASCII punctuation BLIP would leave in, so the tokenizer never sees stray symbols.
_DROP = re.compile(r"[,.'!?\"()*#:;~`\[\]{}<>|\\^_=+@$%&]")
_TO_SPACE = re.compile(r"[-/]")
_SPACES = re.compile(r"\s+")

DEFAULT_MAX_WORDS = 30  # ALBEF and BLIP pre-training configs use max_words=30


def pre_caption(caption, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """Return ``caption`` lower-cased, punctuation stripped, whitespace collapsed and cut
    to ``max_words`` words (``max_words <= 0`` keeps all). Non-strings give ``""``."""
    if not isinstance(caption, str):
        return ""
    text = caption.lower().replace("<person>", "person")  # ALBEF: SBU/CC anonymisation tag
    text = _TO_SPACE.sub(" ", _DROP.sub("", text))
    words = _SPACES.sub(" ", text).strip().split(" ")
    if max_words > 0:
        words = words[:max_words]
    return " ".join(w for w in words if w)


def clean_captions(captions, max_words: int = DEFAULT_MAX_WORDS) -> list[str]:
    """Clean a caption or a list of captions; drop the ones that end up empty and
    duplicates (Visual Genome repeats region phrases), keeping the first order."""
    if isinstance(captions, str) or captions is None:
        captions = [captions]
    if not isinstance(captions, (list, tuple)):
        return []
    out: list[str] = []
    for c in captions:
        c = pre_caption(c, max_words)
        if c and c not in out:
            out.append(c)
    return out
