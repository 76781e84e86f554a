"""Image transforms of ALBEF/BLIP pre-training and caption cleaning.

Train: RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment(2, 7) restricted to
ALBEF's op set (no colour-changing ops, so captions that name colours stay true) ->
ToTensor -> CLIP/ALBEF normalisation. Eval: bicubic resize to a square, no augmentation.
"""
from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from data_prep.captions import pre_caption  # one caption cleaner for data_prep and loading

__all__ = ["MEAN", "STD", "AlbefRandAugment", "train_transform", "eval_transform", "decode_image",
           "pre_caption", "denormalize"]

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# ALBEF's RandomAugment(2, 7, isPIL=True, augs=[...]) op list.
ALBEF_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
             "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class AlbefRandAugment(T.RandAugment):
    """torchvision's RandAugment over ALBEF's op set; magnitude 7 of 10 as in ALBEF."""

    def __init__(self, num_ops: int = 2, magnitude: int = 7, num_magnitude_bins: int = 11):
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins,
                         interpolation=InterpolationMode.BICUBIC)

    def _augmentation_space(self, num_bins, image_size):  # noqa: D401 - torchvision hook
        space = super()._augmentation_space(num_bins, image_size)
        return {k: v for k, v in space.items() if k in ALBEF_OPS}


def train_transform(image_size: int, crop_scale=(0.5, 1.0), randaugment: bool = True, hflip: bool = True) -> T.Compose:
    ops = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if randaugment:
        ops.append(AlbefRandAugment())
    ops += [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(ops)


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
