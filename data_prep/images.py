"""Check, resize and JPEG-encode images with PIL, telling apart the ways an image can be bad."""
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from .reasons import NOT_AN_IMAGE, TOO_LARGE, TOO_SMALL, TRUNCATED, Skip

RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")  # img2dataset's names
JPEG_QUALITY = 95


def open_checked(data: bytes, min_size: int = 0) -> Image.Image:
    """Open ``data`` as an image and decode it fully; raise :class:`Skip` with reason
    ``not an image``, ``truncated``, ``too small`` or ``too large``.

    The full decode is what catches a truncated JPEG: its header parses fine and PIL only
    notices the missing bytes when it reaches them.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.size  # noqa: B018 - forces the header parse inside the guarded block
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Skip(TOO_LARGE, str(err)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        # PIL names the stream object ("<_io.BytesIO object at 0x...>"): noise in a report
        raise Skip(NOT_AN_IMAGE, re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-f]+>", "", str(err))
                   or type(err).__name__) from None
    if min(im.size) < min_size:
        raise Skip(TOO_SMALL, f"{im.size[0]}x{im.size[1]} < {min_size}")
    try:
        im.load()
    except OSError as err:
        reason = TRUNCATED if "truncated" in str(err) or "broken data stream" in str(err) else NOT_AN_IMAGE
        raise Skip(reason, str(err)) from None
    except (ValueError, SyntaxError) as err:
        raise Skip(NOT_AN_IMAGE, str(err)) from None
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))  # white, like img2dataset's alpha matting
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB") if im.mode != "RGB" else im


def _resize(im: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize like img2dataset with ``resize_only_if_bigger=True`` (never upscale)."""
    w, h = im.size
    if mode in ("keep_ratio", "center_crop") and min(w, h) > size:
        s = size / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    elif mode == "border" and max(w, h) > size:
        s = size / max(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    w, h = im.size
    if mode == "center_crop" and (w > size or h > size):
        left, top = (w - min(w, size)) // 2, (h - min(h, size)) // 2
        im = im.crop((left, top, left + min(w, size), top + min(h, size)))
    elif mode == "border" and (w < size or h < size):
        canvas = Image.new("RGB", (max(w, size), max(h, size)), (255, 255, 255))
        canvas.paste(im, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        im = canvas
    return im


def prepare_image(data: bytes, image_size: int = 0, resize_mode: str = "keep_ratio",
                  min_size: int = 0) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Validate image bytes and return ``(jpeg_bytes, original_size, stored_size)``.

    Sizes are ``(width, height)``. ``image_size <= 0`` or ``resize_mode == "no"`` keeps the
    resolution; an RGB/grey JPEG that needs no resizing is passed through byte for byte
    (re-encoding would only lose quality and cost CPU). Raises :class:`Skip` for bad images.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    im = open_checked(data, min_size)
    original = im.size
    resize = image_size > 0 and _needs_resize(original, image_size, resize_mode)
    if not resize and im.format == "JPEG" and im.mode in ("RGB", "L"):
        return data, original, original
    im = _to_rgb(im)
    if resize:
        im = _resize(im, image_size, resize_mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), original, im.size


def _needs_resize(size: tuple[int, int], target: int, mode: str) -> bool:
    short, long = min(size), max(size)
    if mode == "keep_ratio":
        return short > target
    if mode == "center_crop":
        return long > target  # scale the short side down and/or crop the long one
    if mode == "border":
        return long > target  # scale the long side down, then pad to a square
    return False
