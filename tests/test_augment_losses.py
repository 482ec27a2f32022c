"""Augmentation strength and the masked multi-task loss."""

import numpy as np
import pytest
import torch

from fer_tune.data.augment import build_augment
from fer_tune.data.sources import read_image
from fer_tune.data.synthetic import sample_faces
from fer_tune.losses import ccc_loss, multitask_loss
from fer_tune.spec import LossSpec


def face():
    from fer_tune.data.synthetic import render_face
    return render_face(sample_faces(1, seed=4).iloc[0], 64)


def test_strength_zero_is_identity_and_change_grows_with_strength():
    assert build_augment(0.0, 64) is None
    image = face()
    change = []
    for strength in (0.1, 0.4, 1.0):
        augment = build_augment(strength, 64, seed=0)
        change.append(np.mean([np.abs(augment(image=image)["image"].astype(float) - image).mean() for _ in range(60)]))
    assert change[0] < change[1] < change[2], change
    assert augment(image=image)["image"].shape == image.shape


def test_loss_masks_missing_targets():
    torch.manual_seed(0)
    out = {"expression": torch.randn(6, 8, requires_grad=True), "valence": torch.rand(6) * 2 - 1,
           "arousal": torch.rand(6) * 2 - 1}
    nan = float("nan")
    targets = {"expression": torch.tensor([1, -1, 3, 3, -1, 0]),
               "valence": torch.tensor([0.5, nan, -0.2, nan, 0.1, 0.0]),
               "arousal": torch.full((6,), nan)}
    weights = LossSpec(expression=1.0, valence=0.5, arousal=0.3)
    total, parts = multitask_loss(out, targets, weights)
    keep = torch.tensor([0, 2, 3, 5])
    ce = torch.nn.functional.cross_entropy(out["expression"][keep], targets["expression"][keep])
    v = torch.tensor([0, 2, 4, 5])
    mse = ((out["valence"][v] - targets["valence"][v]) ** 2).mean()
    assert total.item() == pytest.approx((ce + 0.5 * mse).item(), rel=1e-6)
    assert set(parts) == {"expression", "valence"}
    total.backward()
    assert out["expression"].grad[1].abs().sum() == 0  # unlabelled rows get no gradient


def test_ccc_loss_by_hand():
    pred, true = torch.tensor([0.1, 0.4, -0.3, 0.8]), torch.tensor([0.0, 0.5, -0.5, 1.0])
    pm, tm = 0.25, 0.25
    pv = ((0.1 - pm) ** 2 + (0.4 - pm) ** 2 + (-0.3 - pm) ** 2 + (0.8 - pm) ** 2) / 4
    tv = ((0.0 - tm) ** 2 + (0.5 - tm) ** 2 + (-0.5 - tm) ** 2 + (1.0 - tm) ** 2) / 4
    cov = ((0.1 - pm) * (0.0 - tm) + (0.4 - pm) * (0.5 - tm) + (-0.3 - pm) * (-0.5 - tm) + (0.8 - pm) * (1.0 - tm)) / 4
    assert ccc_loss(pred, true).item() == pytest.approx(1 - 2 * cov / (pv + tv), abs=1e-6)
