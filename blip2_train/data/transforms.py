"""LAVIS's image transforms with CLIP's normalisation (docs/blip2_numerics.md section 4)."""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def train_transform(size: int) -> T.Compose:
    """RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def eval_transform(size: int) -> T.Compose:
    """Plain bicubic resize to size x size, no crop."""
    return T.Compose([
        T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def image_processor(cfg):
    """transformers' BlipImageProcessor doing what :func:`eval_transform` does (an export's processor)."""
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    size = int(cfg.encoder.image_size)
    return BlipImageProcessor(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_rescale=True,
                               do_normalize=True, do_convert_rgb=True)
