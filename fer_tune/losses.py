"""Weighted multi-task loss with masks for missing targets.

Expression labels of -1 and valence/arousal of NaN are "not annotated" and contribute nothing.
A task with no annotated sample in a batch still adds `0 * output`, so every head stays in the
autograd graph (DDP requires every parameter to receive a gradient each step).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Lin's concordance correlation coefficient over the batch."""
    pm, tm = pred.mean(), target.mean()
    pv, tv = pred.var(unbiased=False), target.var(unbiased=False)
    cov = ((pred - pm) * (target - tm)).mean()
    return 1 - 2 * cov / (pv + tv + (pm - tm) ** 2 + 1e-8)


def multitask_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], loss_spec,
                   label_smoothing: float = 0.0,
                   class_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Return (total loss, {task: loss value}) for the tasks annotated in this batch."""
    total = outputs["expression"].sum() * 0.0 + outputs["valence"].sum() * 0.0 + outputs["arousal"].sum() * 0.0
    parts: dict[str, float] = {}

    labels = targets["expression"]
    has_label = labels >= 0
    if loss_spec.expression > 0 and has_label.any():
        ce = F.cross_entropy(outputs["expression"][has_label].float(), labels[has_label],
                             weight=class_weights, label_smoothing=label_smoothing)
        total = total + loss_spec.expression * ce
        parts["expression"] = ce.item()

    for task in ("valence", "arousal"):
        weight = getattr(loss_spec, task)
        target = targets[task]
        has_value = ~torch.isnan(target)
        if weight <= 0 or not has_value.any():
            continue
        pred, true = outputs[task][has_value].float(), target[has_value]
        if loss_spec.regression == "ccc" and has_value.sum() > 1:
            term = ccc_loss(pred, true)
        else:
            term = F.mse_loss(pred, true)
        total = total + weight * term
        parts[task] = term.item()
    return total, parts


def inverse_frequency_weights(labels, present: list[int], num_classes: int) -> torch.Tensor:
    """Class weights n / (k * count) for present classes (0 for absent ones): balanced CE."""
    counts = torch.bincount(torch.as_tensor(labels)[torch.as_tensor(labels) >= 0], minlength=num_classes).float()
    weights = torch.zeros(num_classes)
    total = counts[present].sum()
    for c in present:
        weights[c] = total / (len(present) * counts[c].clamp(min=1))
    return weights
