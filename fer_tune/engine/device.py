"""The torch device a training or evaluation process uses."""

from __future__ import annotations

import torch

from fer_tune.errors import UserError


def choose_device(use_gpu) -> torch.device:
    """`resources.use_gpu`: True needs a CUDA GPU, "auto" takes one when visible, False never does."""
    if use_gpu is True and not torch.cuda.is_available():
        raise UserError("resources.use_gpu: true but no CUDA GPU is visible here; use auto or false")
    if use_gpu is not False and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
