"""Why a row was skipped: the fixed vocabulary counted in the manifest."""

HTTP_404 = "404"
HTTP_ERROR = "http error"          # any other HTTP status
DOWNLOAD_ERROR = "download error"  # timeouts, refused connections, DNS, robots directives
NOT_AN_IMAGE = "not an image"      # e.g. an HTML page served instead of the image
TRUNCATED = "truncated"
TOO_SMALL = "too small"
TOO_LARGE = "too large"            # PIL's decompression-bomb limit
MISSING_FILE = "missing file"
EMPTY_CAPTION = "empty caption"
EMPTY_TEXT = "empty text"          # a downstream question, statement or hypothesis
UNKNOWN_LABEL = "unknown label"    # NLVR2 / SNLI-VE label outside the task's set
BAD_ROW = "bad row"                # a malformed annotation entry or URL line
OTHER = "other"


class Skip(Exception):
    """Raised for one bad row: counted under ``reason`` and skipped, never fatal."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def classify_download_error(message: str) -> str:
    """Map an img2dataset error message to one of the reasons above."""
    msg = (message or "").strip()
    low = msg.lower()
    for reason in (NOT_AN_IMAGE, TRUNCATED, TOO_SMALL, TOO_LARGE):
        if low.startswith(reason):  # messages produced by our checking resizer
            return reason
    if "http error 404" in low:
        return HTTP_404
    if low.startswith("http error"):
        return HTTP_ERROR
    if "image too small" in low:
        return TOO_SMALL
    if "decoding error" in low or "cannot identify image" in low:
        return NOT_AN_IMAGE
    if "urlopen error" in low or "timed out" in low or "x-robots-tag" in low or "connection" in low:
        return DOWNLOAD_ERROR
    return OTHER
