"""`fer-tune predict MODEL clip.mp4`: faces found, tracked and read frame by frame in a video.

Frames are decoded with OpenCV (every `--every`-th one). Each frame's faces are found by the same
detector as photos, matched to the tracks of the frames before by box overlap (IoU, greedily, best
pair first), and keep their track's id while they stay in view; a track unseen for `MAX_GAP`
processed frames ends. A track's probabilities and valence/arousal are smoothed over its last
`--smooth` processed frames (a moving mean), because a face's expression does not change between
two frames 40 ms apart, while a single frame's reading does.

Written to --out: predictions.csv (one row per face per processed frame: frame, time, track, box,
expression, smoothed probabilities, valence, arousal, and the frame's raw expression), annotated.mp4
(boxes, track ids, labels and the valence/arousal dial), tracks.csv (per track: its frames, first
and last time, share of time per expression, mean valence and arousal) and tracks.png (valence and
arousal of every track over time).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd

from fer_tune import EXPRESSIONS
from fer_tune.commands.predict import BATCH_SIZE, PROBABILITY_COLUMNS, annotate, to_batch
from fer_tune.data.faces import DEFAULT_MARGIN, Face, check_margin, crop_face, iou, make_detector, resize_face
from fer_tune.engine.runtime import load_runtime
from fer_tune.errors import UserError
from fer_tune.io import atomic_write, check_writable

MATCH_IOU = 0.3
"""Least box overlap for a face to continue a track."""
MAX_GAP = 5
"""Processed frames a track may go unseen (a missed detection, a turned head) before it ends."""

MAX_PENDING_FRAMES = 16
"""Decoded frames held while a batch of faces fills (frames without faces add none)."""

COLUMNS = ["frame", "time", "track", "x", "y", "w", "h", "expression", *PROBABILITY_COLUMNS, "valence", "arousal",
           "frame_expression"]


@dataclass
class Track:
    id: int
    box: tuple
    last_seen: int  # processed-frame index
    window: deque = field(default_factory=deque)  # recent (probabilities, valence, arousal)


class Tracker:
    """Boxes of one frame -> track ids, by greedy IoU matching against the live tracks."""

    def __init__(self, smooth: int):
        self.smooth, self.tracks, self.next_id, self.step = smooth, [], 1, 0

    def assign(self, boxes: list[tuple]) -> list[Track]:
        live = [t for t in self.tracks if self.step - t.last_seen <= MAX_GAP]
        pairs = sorted(((iou(box, t.box), i, t.id) for i, box in enumerate(boxes) for t in live), reverse=True)
        chosen: dict[int, Track] = {}
        used: set[int] = set()
        by_id = {t.id: t for t in live}
        for overlap, i, track_id in pairs:
            if overlap < MATCH_IOU:
                break
            if i in chosen or track_id in used:
                continue
            chosen[i], used = by_id[track_id], used | {track_id}
        out = []
        for i, box in enumerate(boxes):
            track = chosen.get(i)
            if track is None:
                track = Track(self.next_id, box, self.step, deque(maxlen=self.smooth))
                self.next_id += 1
                live.append(track)
            track.box, track.last_seen = box, self.step
            out.append(track)
        self.tracks = live
        self.step += 1
        return out


@dataclass
class VideoResult:
    table: pd.DataFrame
    tracks: pd.DataFrame
    frames: int          # processed frames
    seconds: float
    detect_seconds: float
    network_seconds: float


def predict_video(runtime, path: Path, out: Path, every: int = 1, smooth: int = 5, margin: float = DEFAULT_MARGIN,
                  level_eyes: bool = False, detector_name: str = "auto", progress: bool = True) -> VideoResult:
    """Every `every`-th frame of the video at `path`: faces tracked, read, smoothed; files to `out`."""
    from tqdm import tqdm

    if every < 1:
        raise UserError(f"--every {every}: must be 1 or more (1: every frame)")
    if smooth < 1:
        raise UserError(f"--smooth {smooth}: must be 1 or more frames (1: no smoothing)")
    check_margin(margin)
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise UserError(f"{path}: not a video OpenCV can read")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    check_writable(out)
    if total == 0 and not capture.grab():
        capture.release()
        raise UserError(f"{path}: the video has no frames")
    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
    detector = make_detector(detector_name, level_eyes=level_eyes)
    rows_path = out / "predictions.csv"
    partial_rows = out / ".predictions.partial.csv"
    pd.DataFrame(columns=COLUMNS).to_csv(partial_rows, index=False)  # rows are appended as frames are read
    tracker = Tracker(smooth)
    rows: list[dict] = []
    writer, writer_size, written_path = None, None, out / ".annotated.partial.mp4"
    started, detect_seconds, network_seconds, processed = time.perf_counter(), 0.0, 0.0, 0
    bar = tqdm(total=total or None, desc="frames", unit="frame", disable=None if progress else True)
    index = -1
    pending: list[tuple[int, np.ndarray, list[Face], list[Track]]] = []

    def flush() -> None:
        nonlocal network_seconds, writer, writer_size
        crops = [resize_face(crop_face(rgb, face, margin), runtime.image_size)
                 for _, rgb, faces, _ in pending for face in faces]
        tick = time.perf_counter()
        probs, valence, arousal = runtime(to_batch(crops)) if crops else (np.zeros((0, len(EXPRESSIONS))), [], [])
        network_seconds += time.perf_counter() - tick
        k, first_new = 0, len(rows)
        for frame_index, rgb, faces, tracks in pending:
            shown = []
            for face, track in zip(faces, tracks):
                track.window.append((np.asarray(probs[k], dtype=np.float64), float(valence[k]), float(arousal[k])))
                mean_p = np.mean([w[0] for w in track.window], axis=0)
                row = {"frame": frame_index, "time": round(frame_index / fps, 4), "track": track.id,
                       "x": face.x, "y": face.y, "w": face.w, "h": face.h,
                       "expression": EXPRESSIONS[int(np.argmax(mean_p))],
                       **{c: float(p) for c, p in zip(PROBABILITY_COLUMNS, mean_p)},
                       "valence": float(np.mean([w[1] for w in track.window])),
                       "arousal": float(np.mean([w[2] for w in track.window])),
                       "frame_expression": EXPRESSIONS[int(np.argmax(probs[k]))]}
                rows.append(row)
                shown.append({**row, "label": f"#{track.id} "})
                k += 1
            frame = annotate(rgb, shown)
            if writer is None:
                writer_size = (frame.shape[1], frame.shape[0])
                writer = cv2.VideoWriter(str(written_path), cv2.VideoWriter_fourcc(*"mp4v"), fps / every, writer_size)
                if not writer.isOpened():
                    raise UserError(f"{written_path}: OpenCV cannot write an mp4v video here (no encoder in this "
                                    f"OpenCV build, or the folder is not writable)")
            if (frame.shape[1], frame.shape[0]) != writer_size:
                frame = cv2.resize(frame, writer_size, interpolation=cv2.INTER_AREA)
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        pending.clear()
        pd.DataFrame(rows[first_new:], columns=COLUMNS).to_csv(partial_rows, mode="a", header=False, index=False,
                                                               float_format="%.6f")

    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            index += 1
            bar.update(1)
            if index % every:
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            tick = time.perf_counter()
            faces = sorted(detector.find(rgb), key=lambda f: (f.x, f.y))
            detect_seconds += time.perf_counter() - tick
            tracks = tracker.assign([(f.x, f.y, f.w, f.h) for f in faces])
            pending.append((index, rgb, faces, tracks))
            processed += 1
            if sum(len(p[2]) for p in pending) >= BATCH_SIZE or len(pending) >= MAX_PENDING_FRAMES:
                flush()
        flush()
    except BaseException:  # interrupted or failed mid-way: the rows of the frames read so far are kept
        partial_rows.replace(rows_path)
        raise
    finally:
        bar.close()
        capture.release()
        if writer is not None:
            writer.release()
    if processed == 0:
        written_path.unlink(missing_ok=True)
        partial_rows.unlink(missing_ok=True)
        raise UserError(f"{path}: no frame could be decoded; not a video OpenCV can read")
    written_path.replace(out / "annotated.mp4")
    partial_rows.replace(rows_path)
    table = pd.DataFrame(rows, columns=COLUMNS)
    tracks = track_summary(table, every / fps)
    atomic_write(out / "tracks.csv", lambda tmp: tracks.to_csv(tmp, index=False, float_format="%.4f"))
    if len(table):
        plot_tracks(table, out / "tracks.png")
    return VideoResult(table, tracks, processed, time.perf_counter() - started, detect_seconds, network_seconds)


def track_summary(table: pd.DataFrame, frame_seconds: float) -> pd.DataFrame:
    """Per track: frames seen, first and last time, share of its frames per (smoothed) expression,
    mean valence and arousal."""
    rows = []
    for track, part in table.groupby("track", sort=True):
        shares = part["expression"].value_counts(normalize=True)
        rows.append({"track": int(track), "frames": len(part), "first": part["time"].min(), "last": part["time"].max(),
                     "seconds_seen": round(len(part) * frame_seconds, 3),
                     "main_expression": shares.index[0],
                     **{f"share_{name}": float(shares.get(name, 0.0)) for name in EXPRESSIONS},
                     "mean_valence": part["valence"].mean(), "mean_arousal": part["arousal"].mean()})
    return pd.DataFrame(rows)


def plot_tracks(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for track, part in table.groupby("track"):
        for ax, column in zip(axes, ("valence", "arousal")):
            ax.plot(part["time"], part[column], label=f"track {track}")
    for ax, column in zip(axes, ("valence", "arousal")):
        ax.set_ylabel(column)
        ax.set_ylim(-1, 1)
        ax.axhline(0, color="0.8", lw=0.8)
    axes[1].set_xlabel("time (s)")
    axes[0].legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def summarize_video(result: VideoResult, path: Path, out: Path) -> str:
    rate = result.frames / result.seconds if result.seconds > 0 else float("nan")
    if result.table.empty:
        return (f"{path}: {result.frames} frame(s) read in {result.seconds:.1f} s ({rate:.1f} frames/s): no face "
                f"found in any of them; wrote an empty {out / 'predictions.csv'} and {out / 'annotated.mp4'}")
    lines = [f"{path}: {result.frames} frame(s) read in {result.seconds:.1f} s ({rate:.1f} frames/s; detection "
             f"{result.detect_seconds:.1f} s, network {result.network_seconds:.1f} s), {len(result.table)} face "
             f"reading(s) in {len(result.tracks)} track(s)"]
    for _, t in result.tracks.head(10).iterrows():
        lines.append(f"  track {t['track']}: {t['frames']} frame(s) from {t['first']:.1f} s to {t['last']:.1f} s, mostly "
                     f"{t['main_expression']}, valence {t['mean_valence']:+.2f}, arousal {t['mean_arousal']:+.2f}")
    lines.append(f"wrote {out / 'predictions.csv'}, {out / 'tracks.csv'}, {out / 'tracks.png'} and "
                 f"{out / 'annotated.mp4'}")
    return "\n".join(lines)


def run_predict_video(model: Path, path: Path, out: Optional[Path], every: int, smooth: int, margin: float,
                      level_eyes: bool, detector: str, detect: bool = True) -> VideoResult:
    """`fer-tune predict MODEL clip.mp4 --out DIR`."""
    if not path.is_file():
        raise UserError(f"{path}: no such video file")
    if not detect:
        raise UserError("--no-detect: a video's faces are always found and tracked; leave --no-detect out")
    if out is None:
        raise UserError(f"{path}: a video's predictions need --out DIR (a CSV, an annotated video, a track summary)")
    result = predict_video(load_runtime(model), path, Path(out), every=every, smooth=smooth, margin=margin,
                           level_eyes=level_eyes, detector_name=detector)
    print(summarize_video(result, path, Path(out)), file=sys.stderr)
    return result
