"""Mixup and CutMix on a training batch, with every target mixed by the same lambda.

Mixup (Zhang et al. 2018) blends two images, lam * a + (1 - lam) * b; CutMix (Yun et al. 2019)
pastes a box of b into a, and lam becomes the share of a that is left (timm's box and lambda
correction). With both alphas set, each batch picks one of them at random, as timm's Mixup does.

Targets follow the pixels: the expression target becomes lam * one_hot(a) + (1 - lam) * one_hot(b)
and valence/arousal become lam * v_a + (1 - lam) * v_b. A pair where either image lacks a target
gets no target for that task (an all-zero expression row, NaN valence/arousal): the missing part
of the blend is unknown, so guessing it would teach the model a wrong value. The loss already
skips such rows, so on data without valence/arousal nothing changes for those tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import cutmix_bbox_and_lam

from fer_tune import NUM_EXPRESSIONS


@dataclass
class Mix:
    mode: str                 # "mixup" or "cutmix"
    lam: float                # share of the original image (cutmix: its unpasted area fraction)
    perm: torch.Tensor        # partner of each image
    box: Optional[tuple[int, int, int, int]] = None  # cutmix: y0, y1, x0, x1 of the pasted box


def mix_batch(images: torch.Tensor, targets: dict[str, torch.Tensor], mixup_alpha: float, cutmix_alpha: float,
              num_classes: int = NUM_EXPRESSIONS) -> tuple[torch.Tensor, dict[str, torch.Tensor], Optional[Mix]]:
    """Mix a float batch (N, C, H, W) and its targets; unchanged (and None) when both alphas are 0.

    Randomness comes from numpy's and torch's global generators (seeded by the loop), like timm's.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets, None
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or np.random.rand() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(len(images), device=images.device)
    if use_cutmix:
        box, lam = cutmix_bbox_and_lam(images.shape, lam)
        y0, y1, x0, x1 = (int(v) for v in box)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
        mix = Mix("cutmix", float(lam), perm, (y0, y1, x0, x1))
    else:
        images = lam * images + (1 - lam) * images[perm]
        mix = Mix("mixup", lam, perm)
    return images, mix_targets(targets, mix.lam, perm, num_classes), mix


def mix_targets(targets: dict[str, torch.Tensor], lam: float, perm: torch.Tensor,
                num_classes: int = NUM_EXPRESSIONS) -> dict[str, torch.Tensor]:
    """Soft expression targets and blended valence/arousal; pairs with a missing target drop it."""
    labels = targets["expression"]
    labelled = labels >= 0
    one_hot = F.one_hot(labels.clamp(min=0), num_classes).float()
    soft = lam * one_hot + (1 - lam) * one_hot[perm]
    soft = soft * (labelled & labelled[perm]).unsqueeze(1)
    mixed = {"expression": soft}
    for task in ("valence", "arousal"):
        value = targets[task]
        mixed[task] = lam * value + (1 - lam) * value[perm]  # NaN (missing) in either stays NaN
    return mixed
