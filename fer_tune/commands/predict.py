"""`fer-tune predict`: expression, probabilities, valence and arousal for every face in photos.

Each photo goes through what training did to its images: decoded to RGB (grayscale becomes three
equal channels), the face cropped (`fer_tune.data.faces`, or the whole image with `--no-detect`),
resized to the config's `data.image_size` with INTER_AREA and scaled to [0, 1]; the network
normalises inside. Faces from several photos share one batch. Any exported form of the model runs
it (`fer_tune.engine.runtime.load_runtime`) and they answer the same, to 1e-4.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd

from fer_tune import EXPRESSIONS
from fer_tune.data.faces import (DEFAULT_MARGIN, Face, check_margin, crop_face, make_detector, read_photo,
                                 resize_face)
from fer_tune.data.images import IMAGE_EXTENSIONS, BadImage, is_video, list_images, pil_format
from fer_tune.engine.runtime import load_runtime
from fer_tune.errors import UserError
from fer_tune.io import atomic_write, check_writable

PROBABILITY_COLUMNS = [f"p_{name}" for name in EXPRESSIONS]
COLUMNS = ["image", "face", "x", "y", "w", "h", "expression", *PROBABILITY_COLUMNS, "valence", "arousal"]
"""predictions.csv: one row per face; (x, y, w, h) is the detected box in the photo's pixels."""

BATCH_SIZE = 32

_COLOURS = {  # RGB, one per expression, chosen to stay apart on the dial and on skin
    "neutral": (200, 200, 200), "happy": (255, 205, 0), "sad": (70, 140, 255), "surprise": (255, 110, 230),
    "fear": (165, 95, 255), "disgust": (80, 200, 90), "anger": (255, 55, 55), "contempt": (255, 145, 40),
}


@dataclass
class Prediction:
    """What one run of `predict_photos` found."""

    table: pd.DataFrame
    images: int
    no_face: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    detect_seconds: float = 0.0
    network_seconds: float = 0.0


@dataclass
class _Photo:
    path: Path
    relative: Path  # where its annotated copy goes, under --out/annotated/
    rgb: np.ndarray
    faces: list[Face]
    crops: list[np.ndarray]


def gather_photos(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(photo, path relative to the inputs' common folder) for the files named and the images in folders named."""
    photos: dict[Path, Path] = {}
    for given in inputs:
        given = Path(given)
        if not given.exists():
            raise UserError(f"{given}: no such file or folder; give photos or folders of photos")
        for path in (list_images(given) if given.is_dir() else [given]):
            photos.setdefault(path.resolve(), path)
    if not photos:
        raise UserError(f"{', '.join(map(str, inputs))}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    base = Path(os.path.commonpath([p.parent for p in photos]))
    return [(path, resolved.relative_to(base)) for resolved, path in photos.items()]


def predict_photos(runtime, inputs: list[Path], detect: bool = True, margin: float = DEFAULT_MARGIN,
                   level_eyes: bool = False, annotate_dir: Optional[Path] = None,
                   progress: bool = True, detector_name: str = "auto") -> Prediction:
    """Run `runtime` on every face of every photo; with `annotate_dir`, also write annotated copies."""
    from tqdm import tqdm

    started = time.time()
    photos = gather_photos(inputs)
    detector = make_detector(detector_name, level_eyes=level_eyes) if detect else None
    result = Prediction(table=pd.DataFrame(columns=COLUMNS), images=len(photos))
    rows: list[dict] = []
    pending: list[_Photo] = []

    def flush() -> None:
        crops = [crop for photo in pending for crop in photo.crops]
        tick = time.perf_counter()
        outputs = runtime(to_batch(crops)) if crops else (np.zeros((0, len(EXPRESSIONS))), [], [])
        result.network_seconds += time.perf_counter() - tick
        start = 0
        for photo in pending:
            found = [_row(str(photo.path), i, face, *(o[start + i] for o in outputs))
                     for i, face in enumerate(photo.faces)]
            rows.extend(found)
            if annotate_dir is not None:
                _save(annotate(photo.rgb, found), annotate_dir / photo.relative)
            start += len(photo.faces)
        pending.clear()

    for path, relative in tqdm(photos, desc="predicting", unit="img", disable=None if progress else True):
        try:
            rgb = read_photo(path)
        except BadImage as err:
            result.unreadable.append((str(path), err.reason))
            continue
        height, width = rgb.shape[:2]
        tick = time.perf_counter()
        faces = detector.find(rgb) if detector else [Face(0, 0, width, height)]
        result.detect_seconds += time.perf_counter() - tick
        faces.sort(key=lambda f: (f.x, f.y))  # left to right, as people read a group photo
        if not faces:
            result.no_face.append(str(path))
        crops = [resize_face(crop_face(rgb, f, margin) if detector else rgb, runtime.image_size) for f in faces]
        pending.append(_Photo(path, relative, rgb, faces, crops))
        if sum(len(p.crops) for p in pending) >= BATCH_SIZE:
            flush()
    flush()
    if rows:
        result.table = pd.DataFrame(rows, columns=COLUMNS)
    result.seconds = time.time() - started
    return result


def to_batch(crops: list[np.ndarray]) -> np.ndarray:
    """uint8 (H, W, 3) crops -> float32 (N, 3, H, W) in [0, 1]: the training loop's `.float().div_(255)`."""
    return np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)


def _row(image: str, index: int, face: Face, probs, valence, arousal) -> dict:
    row = {"image": image, "face": index, "x": face.x, "y": face.y, "w": face.w, "h": face.h,
           "expression": EXPRESSIONS[int(np.argmax(probs))]}
    row.update({column: float(p) for column, p in zip(PROBABILITY_COLUMNS, probs)})
    row.update({"valence": float(valence), "arousal": float(arousal)})
    return row


# ----------------------------------------------------------------------------- annotated copies


def annotate(rgb: np.ndarray, rows: list[dict]) -> np.ndarray:
    """A copy of the photo with each face's box, expression and confidence, and a valence/arousal dial.

    Small photos are enlarged first (to a 360 px shorter side) so the labels stay legible.
    """
    zoom = max(1, math.ceil(360 / min(rgb.shape[:2])))
    canvas = cv2.resize(rgb, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC) if zoom > 1 else rgb.copy()
    height, width = canvas.shape[:2]
    thick = max(1, round(min(height, width) / 300))
    font_scale = 0.45 * thick
    if not rows:
        _label(canvas, "no face found", (6, 6), (255, 255, 255), font_scale, thick, anchor_top=True)
    for row in rows:
        x, y, w, h = (round(row[k] * zoom) for k in ("x", "y", "w", "h"))
        colour = _COLOURS[row["expression"]]
        cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), colour, 2 * thick, cv2.LINE_AA)
        text = f"{row.get('label', '')}{row['expression']} {row['p_' + row['expression']]:.0%}"
        _label(canvas, text, (x, y), colour, font_scale, thick, anchor_top=False)
        _dial(canvas, row["valence"], row["arousal"], (x, y, w, h), colour, font_scale, thick)
    return canvas


def _label(canvas, text, corner, colour, font_scale, thick, anchor_top) -> None:
    """Text on a dark band above `corner` (or below it, when there is no room above)."""
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)
    x, y = corner
    top = y - th - base - 4 * thick if not anchor_top and y - th - base - 4 * thick >= 0 else y
    x = min(max(0, x), max(0, canvas.shape[1] - tw - 4 * thick))
    cv2.rectangle(canvas, (x, top), (x + tw + 4 * thick, top + th + base + 4 * thick), (20, 20, 20), -1)
    cv2.putText(canvas, text, (x + 2 * thick, top + th + 2 * thick), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                colour, thick, cv2.LINE_AA)


def _dial(canvas, valence, arousal, box, colour, font_scale, thick) -> None:
    """A small circle at the box's lower right: x = valence, y = arousal (up is aroused), each in [-1, 1]."""
    x, y, w, h = box
    height, width = canvas.shape[:2]
    r = max(14, round(0.16 * w))
    cx = min(max(r + 2, x + w - r), width - r - 2)
    cy = y + h + r + 4 * thick
    if cy + r + 2 > height:  # no room below the box: inside its lower right corner
        cy = y + h - r - 4 * thick
    cv2.circle(canvas, (cx, cy), r, (20, 20, 20), -1, cv2.LINE_AA)
    cv2.circle(canvas, (cx, cy), r, (230, 230, 230), 1, cv2.LINE_AA)
    cv2.line(canvas, (cx - r, cy), (cx + r, cy), (110, 110, 110), 1, cv2.LINE_AA)
    cv2.line(canvas, (cx, cy - r), (cx, cy + r), (110, 110, 110), 1, cv2.LINE_AA)
    dot = (round(cx + valence * (r - 3)), round(cy - arousal * (r - 3)))
    cv2.circle(canvas, dot, max(3, r // 5), colour, -1, cv2.LINE_AA)
    text = f"V {valence:+.2f}  A {arousal:+.2f}"
    (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.8 * font_scale, thick)
    _label(canvas, text, (cx - r - tw - 8 * thick, cy - r // 2), (235, 235, 235), 0.8 * font_scale, thick,
           anchor_top=True)


def _save(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format=pil_format(path), quality=92))


# ----------------------------------------------------------------------------- the command


def run_predict(model: Path, inputs: list[Path], out: Optional[Path], detect: bool, margin: float,
                level_eyes: bool, detector: str = "auto") -> Prediction:
    """`fer-tune predict` on photos: predictions.csv to --out (or as CSV on stdout), a summary on stderr."""
    check_margin(margin)
    videos = [p for p in inputs if is_video(p)]
    if videos:
        raise UserError(f"{videos[0]}: give one video at a time (with --out), not with other inputs")
    if out is not None:
        for given in inputs:
            folder = Path(given).resolve()
            if folder.is_dir() and (folder == Path(out).resolve() or folder in Path(out).resolve().parents):
                raise UserError(f"--out {out}: is inside {given}; the annotated copies would be read as photos "
                                f"next time, choose a folder outside it")
        check_writable(out)
    runtime = load_runtime(model)
    result = predict_photos(runtime, inputs, detect=detect, margin=margin, level_eyes=level_eyes,
                            annotate_dir=Path(out) / "annotated" if out is not None else None,
                            detector_name=detector)
    if out is not None:
        atomic_write(Path(out) / "predictions.csv", lambda tmp: result.table.to_csv(tmp, index=False,
                                                                                   float_format="%.6f"))
    else:
        result.table.to_csv(sys.stdout, index=False, float_format="%.6f")
    print(summarize(result, out), file=sys.stderr)
    return result


def summarize(result: Prediction, out: Optional[Path]) -> str:
    rate = result.images / result.seconds if result.seconds > 0 else float("nan")
    lines = [f"{len(result.table)} face(s) in {result.images} image(s), {result.seconds:.1f} s "
             f"({rate:.1f} images/s; detection {result.detect_seconds:.1f} s, network {result.network_seconds:.1f} s, "
             f"in batches of up to {BATCH_SIZE} faces); {len(result.no_face)} without a face, "
             f"{len(result.unreadable)} unreadable"]
    lines += [f"  unreadable: {path} ({reason})" for path, reason in result.unreadable[:5]]
    lines += [f"  no face: {path}" for path in result.no_face[:5]]
    if out is not None:
        lines.append(f"wrote {Path(out) / 'predictions.csv'} and annotated copies in {Path(out) / 'annotated'}")
    return "\n".join(lines)
