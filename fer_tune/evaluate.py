"""Inference over a cached split, and the held-out test evaluation.

`predict` is shared by the training loop's per-epoch validation and the final test evaluation, so
val and test numbers are computed the same way.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fer_tune.data.dataset import FaceDataset
from fer_tune.metrics import compute_metrics


@torch.no_grad()
def predict(model: torch.nn.Module, split, device: torch.device, batch_size: int = 256,
            indices: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Expression probabilities (N, 8), valence (N,), arousal (N,) for the split (or some rows of it)."""
    dataset = FaceDataset(split)
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices.tolist())
    was_training = model.training
    model.eval()
    probs, valence, arousal = [], [], []
    for images, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out = model(images.to(device, non_blocking=True).float().div_(255))
        probs.append(F.softmax(out["expression"].float(), dim=1).cpu())
        valence.append(out["valence"].float().cpu())
        arousal.append(out["arousal"].float().cpu())
    model.train(was_training)
    if not probs:
        return {"expression": np.zeros((0, 8), np.float32), "valence": np.zeros(0, np.float32),
                "arousal": np.zeros(0, np.float32)}
    return {"expression": torch.cat(probs).numpy(), "valence": torch.cat(valence).numpy(),
            "arousal": torch.cat(arousal).numpy()}


def evaluate_split(model, split, labels, device, ci: bool = True, batch_size: int = 256) -> dict:
    """Metrics (with 95 % bootstrap intervals) of `model` on a whole split."""
    preds = predict(model, split, device, batch_size)
    metrics = compute_metrics(split.targets(), preds, labels=labels, ci=ci)
    return metrics, preds
