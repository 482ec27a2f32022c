"""A trained model in any of its forms, ready to run on the CPU: model.pt, model.ts or model.onnx.

Every form is the same function:

    images  float32 (N, 3, S, S), RGB in [0, 1], S = data.image_size of config.yaml
    ->  probabilities (N, 8)  softmax over `fer_tune.EXPRESSIONS` (AffectNet order)
        valence (N,), arousal (N,)  in [-1, 1]

so the network normalises inside, and the caller only resizes and scales (see
`fer_tune.commands.predict`). `fer_tune.commands.export` writes the exported forms and checks
each against the PyTorch model to `TOLERANCE` before keeping it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_tune import NUM_EXPRESSIONS
from fer_tune.engine.artifacts import TrainedModel, find_trained
from fer_tune.errors import UserError, one_line

INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "valence", "arousal")
TOLERANCE = 1e-4
ONNX_EXTRA = "pip install 'fer-tune[onnx]'"


class InferenceNet(nn.Module):
    """MultiTaskNet as a function of plain tensors: what every exported form computes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(images)
        return F.softmax(out["expression"].float(), dim=1), out["valence"].float(), out["arousal"].float()


def inference_net(trained: TrainedModel) -> InferenceNet:
    """The PyTorch model of a trained model.pt as `InferenceNet`, in eval mode."""
    return InferenceNet(trained.network()).eval()


class TorchRuntime:
    """A model.pt (as `InferenceNet`) or a model.ts: float32 (N, 3, S, S) numpy in, numpy outputs out."""

    def __init__(self, module, image_size: int):
        self.module, self.image_size = module, image_size

    @torch.inference_mode()
    def __call__(self, images):
        outputs = self.module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        return tuple(o.float().numpy() for o in outputs)


class OnnxRuntime:
    """A model.onnx through onnxruntime on the CPU, called like `TorchRuntime`."""

    def __init__(self, path: Path, image_size: int):
        onnxruntime = require_onnx("onnxruntime")["onnxruntime"]
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:
            raise UserError(f"{path}: not a readable ONNX model ({one_line(err, 160)}); re-export it with "
                            f"`fer-tune export DIR --format onnx`") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
            raise UserError(f"{path}: an ONNX model with inputs {inputs} and outputs {outputs}, not a fer-tune "
                            f"export's ({INPUT_NAME} -> {', '.join(OUTPUT_NAMES)}); re-export it with "
                            f"`fer-tune export DIR --format onnx`")
        shape = self.session.get_inputs()[0].shape
        if list(shape[1:]) != [3, image_size, image_size]:
            raise UserError(f"{path}: takes images of shape {shape[1:]}, but config.yaml beside it says "
                            f"data.image_size {image_size}; re-export it with `fer-tune export`")
        self.image_size = image_size

    def __call__(self, images):
        outputs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
        return tuple(np.asarray(o, dtype=np.float32) for o in outputs)


def load_runtime(model_path: Path):
    """The model at `model_path` (folder, model.pt, model.ts or model.onnx), ready to run on the CPU.

    Every runtime has `image_size` and maps float32 images (N, 3, S, S) in [0, 1] to numpy
    (probabilities (N, 8), valence (N,), arousal (N,)).
    """
    trained = find_trained(model_path, exported=True)
    if trained.model_file.suffix == ".onnx":
        return answers_like_fer_tune(OnnxRuntime(trained.model_file, trained.image_size), trained.model_file, "onnx")
    if trained.model_file.suffix == ".ts":
        try:
            module = load_torchscript(trained.model_file)
        except Exception as err:
            raise UserError(f"{trained.model_file}: not a readable TorchScript model ({one_line(err, 160)}); "
                            f"re-export it with `fer-tune export DIR --format torchscript`") from None
        return answers_like_fer_tune(TorchRuntime(module, trained.image_size), trained.model_file, "torchscript")
    return TorchRuntime(inference_net(trained), trained.image_size)


def answers_like_fer_tune(runtime, path: Path, export_format: str):
    """`runtime`, once one blank image gives what a fer-tune export gives: a model file that loads
    but takes or returns something else is refused here, in one line, not mid-way through a folder."""
    blank = np.zeros((1, 3, runtime.image_size, runtime.image_size), dtype=np.float32)
    try:
        outputs = runtime(blank)
        shapes = [tuple(np.shape(o)) for o in outputs]
    except Exception as err:  # a foreign model can raise anything
        raise UserError(f"{path}: does not run as a fer-tune model ({one_line(err, 120)}); re-export it with "
                        f"`fer-tune export DIR --format {export_format}`") from None
    if shapes != [(1, NUM_EXPRESSIONS), (1,), (1,)]:
        raise UserError(f"{path}: returns outputs of shapes {shapes}, not a fer-tune model's (probabilities "
                        f"(N, {NUM_EXPRESSIONS}), valence (N,), arousal (N,)); re-export it with "
                        f"`fer-tune export DIR --format {export_format}`")
    return runtime


def load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, not the user's concern
        return torch.jit.load(str(path), map_location="cpu").eval()


def require_onnx(*names: str) -> dict:
    """The named ONNX packages (exporting needs onnx and onnxscript, running onnxruntime), or a
    UserError saying how to install them: they are an optional extra."""
    import importlib

    modules, missing = {}, []
    for name in names:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX needs the packages {', '.join(missing)}, which are not installed: {ONNX_EXTRA}")
    return modules
