"""Training augmentation from one knob, `augment.strength` in [0, 1].

0 is no augmentation at all (the identity); 1 is strong: random resized crop, flip, rotation,
brightness/contrast, blur or noise, and coarse dropout (occluders). Every magnitude and
probability grows linearly with strength, so a searcher can treat it as one continuous value.
"""

from __future__ import annotations

from typing import Optional

import albumentations as A


def build_augment(strength: float, size: int, seed: Optional[int] = None) -> Optional[A.Compose]:
    """An albumentations pipeline for HxWx3 uint8 images, or None for strength 0."""
    s = float(strength)
    if s <= 0:
        return None
    hole = (max(1, round(0.08 * size)), max(2, round((0.08 + 0.17 * s) * size)))
    pipeline = A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(1 - 0.35 * s, 1.0), ratio=(1 - 0.15 * s, 1 + 0.15 * s), p=s),
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-25 * s, 25 * s), translate_percent=(-0.08 * s, 0.08 * s), border_mode=0, p=s),
        A.RandomBrightnessContrast(brightness_limit=0.4 * s, contrast_limit=0.4 * s, p=s),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.02 + 0.1 * s))], p=0.5 * s),
        A.CoarseDropout(num_holes_range=(1, max(1, round(3 * s))), hole_height_range=hole,
                        hole_width_range=hole, fill=0, p=0.5 * s),
    ], seed=seed)
    return pipeline
