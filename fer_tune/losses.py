"""Weighted multi-task loss with masks for missing targets.

Expression labels of -1 and valence/arousal of NaN are "not annotated" and contribute nothing.
A task with no annotated sample in a batch still adds `0 * output`, so every head stays in the
autograd graph (DDP requires every parameter to receive a gradient each step).

Expression targets are class ids (N,) or, after mixup/cutmix, class probabilities (N, 8) whose
all-zero rows are "not annotated". With `loss.weighting: uncertainty` each task's term is scaled
by a learned precision (`UncertaintyWeights`); `distillation_loss` adds a teacher's soft targets.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fer_tune import TASKS


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Lin's concordance correlation coefficient over the batch."""
    pm, tm = pred.mean(), target.mean()
    pv, tv = pred.var(unbiased=False), target.var(unbiased=False)
    cov = ((pred - pm) * (target - tm)).mean()
    return 1 - 2 * cov / (pv + tv + (pm - tm) ** 2 + 1e-8)


class UncertaintyWeights(nn.Module):
    """One learned log-variance s per task (Kendall, Gal & Cipolla, CVPR 2018).

    A task's term becomes exp(-s) * L + s / 2 for classification and exp(-s) * L / 2 + s / 2 for
    regression: a noisy (high-loss) task learns a large s and is down-weighted, and the + s / 2
    keeps s from running off to infinity. The fixed `loss:` weights still multiply each term.
    """

    def __init__(self):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(len(TASKS)))

    def precisions(self) -> dict[str, float]:
        return {task: float(torch.exp(-s)) for task, s in zip(TASKS, self.log_vars.detach())}


def hard_labels(expression: torch.Tensor) -> torch.Tensor:
    """Class ids from ids or mixed probabilities (the dominant class); -1 where not annotated."""
    if expression.ndim == 1:
        return expression
    return torch.where(expression.sum(1) > 0, expression.argmax(1), torch.full_like(expression[:, 0], -1).long())


def multitask_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], loss_spec,
                   label_smoothing: float = 0.0, class_weights: Optional[torch.Tensor] = None,
                   log_vars: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Return (total loss, {task: loss value}) for the tasks annotated in this batch.

    `log_vars` (from `UncertaintyWeights`) switches on uncertainty weighting; a task with no
    annotated sample in the batch adds nothing, its log-variance included.
    """
    total = outputs["expression"].sum() * 0.0 + outputs["valence"].sum() * 0.0 + outputs["arousal"].sum() * 0.0
    if log_vars is not None:
        total = total + log_vars.sum() * 0.0
    parts: dict[str, float] = {}

    def weighted(index: int, term: torch.Tensor, scale: float) -> torch.Tensor:
        if log_vars is None:
            return term
        return scale * torch.exp(-log_vars[index]) * term + 0.5 * log_vars[index]

    labels = targets["expression"]
    has_label = labels >= 0 if labels.ndim == 1 else labels.sum(1) > 0
    if loss_spec.expression > 0 and has_label.any():
        ce = F.cross_entropy(outputs["expression"][has_label].float(), labels[has_label],
                             weight=class_weights, label_smoothing=label_smoothing)
        total = total + loss_spec.expression * weighted(0, ce, 1.0)
        parts["expression"] = ce.item()

    for index, task in ((1, "valence"), (2, "arousal")):
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
        total = total + weight * weighted(index, term, 0.5)
        parts[task] = term.item()
    return total, parts


def distillation_loss(outputs: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], loss_spec,
                      temperature: float, teacher_tasks: tuple[str, ...] = TASKS) -> torch.Tensor:
    """Hinton et al.'s KL(teacher || student) at temperature T, times T^2 (so its gradients keep
    their size as T changes), plus MSE to the teacher's valence/arousal, weighted like `loss:`.

    Every image gets the teacher's targets, annotated or not; `teacher_tasks` leaves out heads the
    teacher never learned (a teacher trained without valence labels has an untrained valence head).
    """
    total = outputs["expression"].sum() * 0.0
    if "expression" in teacher_tasks and loss_spec.expression > 0:
        kl = F.kl_div(F.log_softmax(outputs["expression"].float() / temperature, dim=1),
                      F.log_softmax(teacher["expression"].float() / temperature, dim=1),
                      reduction="batchmean", log_target=True)
        total = total + loss_spec.expression * kl * temperature ** 2
    for task in ("valence", "arousal"):
        if task in teacher_tasks and getattr(loss_spec, task) > 0:
            total = total + getattr(loss_spec, task) * F.mse_loss(outputs[task].float(), teacher[task].float())
    return total


def inverse_frequency_weights(labels, present: list[int], num_classes: int) -> torch.Tensor:
    """Class weights n / (k * count) for present classes (0 for absent ones): balanced CE."""
    labels = torch.tensor(labels)  # a copy: split tables hand out read-only arrays
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).float()
    weights = torch.zeros(num_classes)
    total = counts[present].sum()
    for c in present:
        weights[c] = total / (len(present) * counts[c].clamp(min=1))
    return weights
