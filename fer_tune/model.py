"""MultiTaskNet: one timm backbone, three heads (expression logits, valence, arousal).

The network takes images as float tensors in [0, 1] and normalises them itself, so training,
evaluation, prediction and exported models all share one preprocessing: resize, scale to [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from fer_tune import NUM_EXPRESSIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiTaskNet(nn.Module):
    def __init__(self, backbone: str, dropout: float = 0.2, pretrained: Optional[Path] = None):
        super().__init__()
        weights = {}
        if pretrained is not None:
            # A local file only: timm reads it instead of going to a hub.
            weights = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained)))
        self.backbone = timm.create_model(backbone, num_classes=0, **weights)
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.dropout = nn.Dropout(dropout)
        self.expression = nn.Linear(features, NUM_EXPRESSIONS)
        self.valence = nn.Linear(features, 1)
        self.arousal = nn.Linear(features, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.dropout(self.backbone((images - self.mean) / self.std))
        return {
            "expression": self.expression(features),
            "valence": torch.tanh(self.valence(features)).squeeze(1),
            "arousal": torch.tanh(self.arousal(features)).squeeze(1),
        }


def create_model(model_spec) -> MultiTaskNet:
    """The one factory: a `ModelSpec` in, a network out."""
    return MultiTaskNet(model_spec.backbone, model_spec.dropout, model_spec.pretrained)
