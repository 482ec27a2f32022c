"""Knowledge distillation's teacher: a finished experiment's best model, frozen, run on the student's batches.

Not a second training loop: `distill:` is a spec section that `fit` honours (it loads the teacher
once and adds `losses.distillation_loss` to every step), so `fer-tune train` trains one student
and `fer-tune run` searches the student's own `space:` (distill.temperature and distill.alpha
are searchable too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fer_tune.engine.artifacts import find_trained


@dataclass
class Teacher:
    """A frozen, evaluating model that sees the student's batch at its own training size."""

    model: nn.Module
    image_size: int
    tasks: tuple[str, ...]  # heads it was trained on; the others are not used as targets

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.model(images)


def load_teacher(path: Path, device: torch.device) -> Teacher:
    """The best model of a finished experiment (folder, best/ folder or model.pt), frozen.

    Read through `find_trained`, so a teacher whose dataset has moved away still loads, and its
    weights are checked against its config like `fer-tune evaluate` does.
    """
    trained = find_trained(Path(path))
    model = trained.network().requires_grad_(False).to(device)
    return Teacher(model, trained.image_size, trained.tasks)
