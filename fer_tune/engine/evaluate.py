"""Inference over a cached split, and the held-out test evaluation.

`predict` is shared by the training loop's per-epoch validation and the final test evaluation, so
val and test numbers are computed the same way. `evaluate_on_test` is the only place the test
split is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fer_tune import EXPRESSIONS, NUM_EXPRESSIONS
from fer_tune.data.dataset import FaceDataset
from fer_tune.data.prepare import PreparedData
from fer_tune.io import atomic_write_json, atomic_write_text
from fer_tune.metrics import compute_metrics, paired_comparison, predicted_classes
from fer_tune.model import create_model
from fer_tune.spec import Spec


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
        return {"expression": np.zeros((0, NUM_EXPRESSIONS), np.float32), "valence": np.zeros(0, np.float32),
                "arousal": np.zeros(0, np.float32)}
    return {"expression": torch.cat(probs).numpy(), "valence": torch.cat(valence).numpy(),
            "arousal": torch.cat(arousal).numpy()}


def evaluate_split(model, split, labels, device, ci: bool = True, batch_size: int = 256) -> dict:
    """Metrics (with 95 % bootstrap intervals) of `model` on a whole split."""
    preds = predict(model, split, device, batch_size)
    metrics = compute_metrics(split.targets(), preds, labels=labels, ci=ci)
    return metrics, preds


def evaluate_on_test(spec: Spec, prepared: PreparedData, weights: dict, device, extra: dict,
                    report_dir: Path) -> dict:
    """The only place the test split is read: load it, evaluate once, write metrics.json."""
    model = create_model(spec.model).to(device)
    model.load_state_dict(weights)
    test = prepared.load("test")
    metrics, preds = evaluate_split(model, test, prepared.labels, device)
    atomic_write_text(report_dir / "test_predictions.csv",
                      predictions_table(test, preds, prepared.labels).to_csv(index=False))
    metrics.update({"split": "test", "test_images": len(test), "labels": prepared.labels,
                    "data": {"source": spec.data.source, "root": str(spec.data.root or ""),
                             "image_size": spec.data.image_size, **prepared.info}, **extra})
    atomic_write_json(report_dir / "metrics.json", metrics)
    return metrics


def predictions_table(split, preds: dict, labels: list[int]) -> pd.DataFrame:
    """One row per test image: targets, predicted class, class probabilities, valence, arousal."""
    targets = split.targets()
    return pd.DataFrame({
        "image": split.table["image"].astype(str).to_numpy(),
        "expression": targets["expression"],
        "expression_pred": predicted_classes(preds["expression"], labels),
        **{f"p_{name}": preds["expression"][:, i] for i, name in enumerate(EXPRESSIONS)},
        "valence": targets["valence"], "valence_pred": preds["valence"],
        "arousal": targets["arousal"], "arousal_pred": preds["arousal"]})


def format_test(metrics: dict, out: Path) -> str:
    """What a command prints after the test: each measured task's metrics, and where they were written."""
    lines = [f"test ({metrics['test_images']} images):"]
    if metrics.get("data", {}).get("test_split"):
        lines[0] = f"test: {metrics['data']['test_split']}"
    for task in ("expression", "valence", "arousal"):
        if task in metrics:
            values = ", ".join(f"{k} {v:.4f}" for k, v in metrics[task].items())
            lines.append(f"  {task}: {values}")
    if metrics.get("missing_tasks"):
        lines.append(f"  not measured (no labels in this data): {', '.join(metrics['missing_tasks'])}")
    lines.append(f"  written to {out}")
    return "\n".join(lines)


def compare_on_test(prepared: PreparedData, device, found: tuple[Spec, dict], yours: tuple[Spec, dict],
                    report_dir: Path) -> dict:
    """The found recipe's model against yours on the same test faces.

    Returns your model's own test metrics (with intervals) under "your_recipe", and from
    `paired_comparison` each metric's difference, found minus yours, with a paired 95 % bootstrap
    interval and McNemar's exact test on expression correctness; writes your model's predictions
    to report/your_recipe_predictions.csv beside the found one's test_predictions.csv.
    """
    test = prepared.load("test")
    preds = {}
    for name, (spec, weights) in (("found", found), ("yours", yours)):
        model = create_model(spec.model).to(device)
        model.load_state_dict(weights)
        preds[name] = predict(model, test, device)
    targets = test.targets()
    atomic_write_text(report_dir / "your_recipe_predictions.csv",
                      predictions_table(test, preds["yours"], prepared.labels).to_csv(index=False))
    return {"your_recipe": compute_metrics(targets, preds["yours"], labels=prepared.labels, ci=True),
            **paired_comparison(targets, preds["yours"], preds["found"], labels=prepared.labels)}
