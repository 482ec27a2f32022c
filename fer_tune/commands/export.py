"""`fer-tune export`: a trained model in two more forms, each checked before it is kept.

`best/model.pt` (weights, from `fer_tune.engine.artifacts.export_best`) is what training writes.
`fer-tune export` adds `best/model.ts` (TorchScript, for libtorch / Python without fer-tune) and
`best/model.onnx` (ONNX, for onnxruntime and friends) next to `best/config.yaml`; every form
computes the same function (see `fer_tune.engine.runtime`). An export is checked before it is
kept: the written file is loaded back and must match the PyTorch model on a batch of another size
than the one it was traced with, to `TOLERANCE`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch

from fer_tune.engine.artifacts import find_trained
from fer_tune.engine.runtime import (INPUT_NAME, OUTPUT_NAMES, TOLERANCE, InferenceNet, OnnxRuntime, TorchRuntime,
                                     inference_net, load_torchscript, require_onnx)
from fer_tune.errors import UserError
from fer_tune.io import atomic_write

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
"""`--format` names and the file each writes in best/."""


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {text}: unknown format '{(unknown or [''])[0]}'; choose from "
                        f"{', '.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(formats))


def export_model(model_path: Path, formats: list[str]) -> list[tuple[Path, float]]:
    """Write each format next to config.yaml; returns (file, largest difference from PyTorch) for each."""
    if "onnx" in formats:
        require_onnx("onnx", "onnxscript", "onnxruntime")  # before any work: say it first
    trained = find_trained(model_path)
    config, spec = trained.config, trained.spec
    net = inference_net(trained)
    size = trained.image_size
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=generator)
    check = torch.rand(3, 3, size, size, generator=generator)  # another batch size: the batch axis stays free
    with torch.inference_mode():
        expected = [o.numpy() for o in net(check)]
    written = []
    for name in formats:
        path = config.parent / FORMATS[name]
        writer = _write_torchscript if name == "torchscript" else _write_onnx

        def write_and_check(tmp: Path) -> None:
            writer(net, example, tmp)
            runtime = OnnxRuntime(tmp, size) if name == "onnx" else TorchRuntime(load_torchscript(tmp), size)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(runtime(check.numpy()), expected))
            if not diff <= TOLERANCE:  # not written: a model that answers differently is worse than none
                raise UserError(f"{path}: the {name} export of backbone '{spec.model.backbone}' differs "
                                f"from the PyTorch model by {diff:.2g} (> {TOLERANCE:g}); not written. "
                                f"Use model.pt, or another --format")
            written.append((path, diff))

        atomic_write(path, write_and_check)
    return written


def _write_torchscript(net: InferenceNet, example: torch.Tensor, path: Path) -> None:
    # Tracing, not scripting: timm backbones trace reliably but many do not script.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice and tracer warnings
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(path))


def _write_onnx(net: InferenceNet, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamo=True, external_data=False, verbose=False, dynamic_shapes=({0: batch},))
