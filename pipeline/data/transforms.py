"""Image transforms of ALBEF/BLIP pre-training and caption cleaning.

Train (:class:`TrainTransform`): RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment(2, 7)
restricted to ALBEF's op set (no colour-changing ops, so captions that name colours stay true;
bilinear, as ALBEF's) -> uint8 ``[3, S, S]``; :func:`normalize` turns a stacked batch into CLIP/ALBEF-normalised floats.
The randomness comes from a ``torch.Generator`` the caller passes in (one per sample): the draws
torchvision's transforms would make from the global RNG seeded alike, so the augmentation of a
sample is a pure function of that generator's seed and no global RNG is touched.
Eval: bicubic resize to a square, no augmentation.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import _apply_op

from data_prep.captions import pre_caption  # one caption cleaner for data_prep and loading

__all__ = ["MEAN", "STD", "AlbefRandAugment", "AugmentParams", "TrainTransform",
           "eval_transform", "decode_image", "normalize", "pre_caption", "denormalize"]

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratio range

# ALBEF's RandomAugment(2, 7, isPIL=True, augs=[...]) op list.
ALBEF_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
             "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class AlbefRandAugment(T.RandAugment):
    """torchvision's RandAugment over ALBEF's op set; magnitude 7 of 10 and bilinear geometric
    ops (ALBEF's cv2 ``INTER_LINEAR``; PIL's bicubic affine costs 2-3x more) as in ALBEF."""

    def __init__(self, num_ops: int = 2, magnitude: int = 7, num_magnitude_bins: int = 11):
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins,
                         interpolation=InterpolationMode.BILINEAR)

    def _augmentation_space(self, num_bins, image_size):  # noqa: D401 - torchvision hook
        space = super()._augmentation_space(num_bins, image_size)
        return {k: v for k, v in space.items() if k in ALBEF_OPS}

    def op_table(self, image_size: int) -> list[tuple[str, float, bool]]:
        """``(op, magnitude, signed)`` of each op for a square ``image_size`` image, in
        torchvision's order (the table its ``forward`` draws from)."""
        space = self._augmentation_space(self.num_magnitude_bins, (image_size, image_size))
        return [(name, float(m[self.magnitude]) if m.ndim > 0 else 0.0, bool(signed))
                for name, (m, signed) in space.items()]


@dataclass(frozen=True)
class AugmentParams:
    """One sample's augmentation: crop box ``(top, left, height, width)`` in the source image's
    pixels, horizontal flip, RandAugment ops ``(name, signed magnitude)``."""

    crop: tuple[int, int, int, int]
    flip: bool
    ops: tuple[tuple[str, float], ...]


def _crop_box(width: int, height: int, scale, ratio, g: torch.Generator) -> tuple[int, int, int, int]:
    """``T.RandomResizedCrop.get_params``, the same draws from ``g`` instead of torch's global RNG."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """Encoded image bytes -> augmented uint8 ``[3, S, S]`` (``[T, 3, S, S]`` for the frames of a
    clip, all with one crop, flip and op list).

    JPEGs are decoded at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling, PIL ``draft``) whenever
    the crop still spans at least ``S`` decoded pixels each way, so nothing is upsampled that a
    full decode would have downsampled. The crop is resized by torch's antialiased bicubic
    interpolation on uint8 (as PIL's bicubic resize, to +-1 grey level).
    """

    def __init__(self, image_size: int, crop_scale=(0.5, 1.0), randaugment: bool = True, hflip: bool = True):
        self.size, self.scale, self.hflip = int(image_size), tuple(crop_scale), hflip
        self.num_ops = 2 if randaugment else 0
        augment = AlbefRandAugment()
        self.ops = augment.op_table(self.size) if randaugment else []
        self.interpolation = augment.interpolation

    def sample(self, width: int, height: int, g: torch.Generator) -> AugmentParams:
        """The augmentation of a ``width x height`` source image: the draws torchvision's
        RandomResizedCrop, RandomHorizontalFlip and RandAugment make, in their order, from ``g``."""
        crop = _crop_box(width, height, self.scale, RATIO, g)
        flip = self.hflip and bool(torch.rand(1, generator=g) < 0.5)
        ops = []
        for _ in range(self.num_ops):
            name, magnitude, signed = self.ops[int(torch.randint(len(self.ops), (1,), generator=g).item())]
            ops.append((name, -magnitude if signed and torch.randint(2, (1,), generator=g) else magnitude))
        return AugmentParams(crop, flip, tuple(ops))

    def apply(self, img: Image.Image, params: AugmentParams) -> torch.Tensor:
        """Decode an opened (not yet loaded) image and apply ``params``: uint8 ``[3, S, S]``;
        a broken image raises."""
        top, left, h, w = params.crop
        r = 1
        if isinstance(img, JpegImageFile):
            r = next((k for k in (8, 4, 2) if min(h, w) >= self.size * k), 1)
            width = img.width
            drafted = img.draft("RGB", (width // r, img.height // r)) if r > 1 else None
            r = round(width / drafted[1][2]) if drafted else 1  # (mode, (0, 0, width / scale, ...))
        if img.mode != "RGB":
            img = img.convert("RGB")
        pixels = torch.from_numpy(np.array(img))  # [H, W, 3]: decodes; a truncated file raises here
        # decoded pixel k covers source pixels [k r, (k + 1) r): the crop snaps to that grid
        # (moves by < r source pixels) and keeps >= S decoded pixels each way
        y0, x0 = top // r, left // r
        y1, x1 = y0 + h // r, x0 + w // r
        # torch's antialiased bicubic on uint8 matches PIL's resize to +-1 and runs several times
        # faster; the [1, 3, h, w] view of the HWC crop is channels-last, its fast layout
        out = F.interpolate(pixels[y0:y1, x0:x1].permute(2, 0, 1)[None], size=(self.size, self.size),
                            mode="bicubic", antialias=True)[0]
        if params.flip:
            out = out.flip(-1)
        if params.ops:  # RandAugment's ops run on PIL images, as torchvision's RandAugment does
            aug = Image.fromarray(out.permute(1, 2, 0).numpy())
            for name, magnitude in params.ops:
                aug = _apply_op(aug, name, magnitude, interpolation=self.interpolation, fill=None)
            out = torch.from_numpy(np.array(aug)).permute(2, 0, 1)
        return out

    def __call__(self, frames: list[bytes], g: torch.Generator) -> torch.Tensor:
        """Encoded frames (one for an image) -> uint8 ``[T, 3, S, S]``."""
        images = [Image.open(io.BytesIO(f)) for f in frames]
        params = self.sample(*images[0].size, g)
        return torch.stack([self.apply(img, params) for img in images])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 with CLIP/ALBEF normalisation, as ``T.ToTensor`` then
    ``T.Normalize(MEAN, STD)`` (one pass over a whole batch instead of two per sample)."""
    mean = torch.tensor(MEAN).mul_(255).view(3, 1, 1)
    std = torch.tensor(STD).mul_(255).view(3, 1, 1)
    return images.float().sub_(mean).div_(std)


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose([
        T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def decode_image(data: bytes) -> Image.Image:
    """Raw image bytes -> RGB PIL image; a truncated or broken file raises."""
    with io.BytesIO(data) as stream:
        img = Image.open(stream)
        img.load()
        return img.convert("RGB")


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised [B, 3, H, W] -> [0, 1] for display."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)
