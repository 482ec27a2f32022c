"""`fer-tune predict MODEL clip.mp4`: faces tracked across frames, smoothed, written out.

The footage is made here: two real FER2013 faces moving across a noisy canvas (one bright, one
dark, so a stand-in network can tell them apart), the second entering at frame 10, written with
OpenCV; every face's box in every frame is known.
"""

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_tune import EXPRESSIONS
from fer_tune.cli import main
from fer_tune.commands import video
from fer_tune.data.faces import Face

from composed import fer_faces
from conftest import FER2013

needs_fer = pytest.mark.skipif(not FER2013.is_dir(), reason=f"{FER2013} is absent")
FRAMES, FPS, TILE = 30, 10, 100


def truth_boxes(frame: int) -> list[tuple]:
    boxes = [(20 + 8 * frame, 20, TILE, TILE)]  # face A: bright, left to right along the top
    if frame >= 10:
        boxes.append((360 - 6 * (frame - 10), 150, TILE, TILE))  # face B: dark, right to left below
    return boxes


def make_clip(path):
    faces = fer_faces()
    happy = next(p for p in faces if p.parent.name == "happy")
    sad = next(p for p in faces if p.parent.name == "sad")
    tiles = [cv2.resize(np.asarray(Image.open(p).convert("L"), np.float64), (TILE, TILE)) for p in (happy, sad)]
    tiles = [np.clip(tiles[0] * 0.5 + 120, 0, 255), np.clip(tiles[1] * 0.5, 0, 255)]  # bright / dark
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (480, 270))
    rng = np.random.default_rng(0)
    for frame in range(FRAMES):
        canvas = np.full((270, 480), 100.0) + rng.normal(0, 8, (270, 480))
        for tile, (x, y, w, h) in zip(tiles, truth_boxes(frame)):
            canvas[y:y + h, x:x + w] = tile
        writer.write(cv2.cvtColor(np.clip(canvas, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


class TruthDetector:
    """Gives each processed frame's true boxes (frames 0, every, 2 * every, ...)."""

    def __init__(self, every: int):
        self.every, self.calls = every, 0

    def find(self, rgb):
        frame, self.calls = self.calls * self.every, self.calls + 1
        return [Face(*box) for box in truth_boxes(frame)]


class BrightnessNet:
    """A stand-in network: a bright crop is happy, a dark one sad; each face's valence flips sign at
    every reading of it (+0.8, -0.8, ...), so a window of an even length averages to 0."""

    image_size = 48

    def __init__(self):
        self.reads = {True: 0, False: 0}

    def __call__(self, images):
        n = len(images)
        bright = images.mean(axis=(1, 2, 3)) > 0.35
        probs = np.full((n, len(EXPRESSIONS)), 0.02)
        probs[np.arange(n), np.where(bright, EXPRESSIONS.index("happy"), EXPRESSIONS.index("sad"))] = 0.86
        valence = []
        for face in bright.tolist():
            valence.append(0.8 if self.reads[face] % 2 == 0 else -0.8)
            self.reads[face] += 1
        return probs, np.array(valence), np.zeros(n)


@needs_fer
@pytest.mark.parametrize("every, smooth", [(1, 1), (2, 4)])
def test_a_clip_gives_one_row_per_face_per_frame_and_each_face_keeps_its_track(tmp_path, monkeypatch, every, smooth):
    clip = make_clip(tmp_path / "clip.mp4")
    monkeypatch.setattr(video, "make_detector", lambda name, level_eyes=False: TruthDetector(every))
    result = video.predict_video(BrightnessNet(), clip, tmp_path / "out", every=every, smooth=smooth, progress=False)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    frames = list(range(0, FRAMES, every))
    assert result.frames == len(frames) and sorted(set(table["frame"])) == frames
    assert [len(table[table["frame"] == f]) for f in frames] == [len(truth_boxes(f)) for f in frames]
    np.testing.assert_allclose(table.groupby("frame")["time"].first().to_numpy(), np.array(frames) / FPS, atol=1e-3)
    # two tracks: the bright face (happy) from the first frame, the dark one (sad) from frame 10
    assert sorted(set(table["track"])) == [1, 2]
    first, second = table[table["track"] == 1], table[table["track"] == 2]
    assert set(first["expression"]) == {"happy"} and set(second["expression"]) == {"sad"}
    assert second["frame"].min() == min(f for f in frames if f >= 10)
    assert first["x"].tolist() == [truth_boxes(f)[0][0] for f in first["frame"]]
    # smoothing: valence is the mean over the track's last `smooth` readings
    if smooth == 1:
        assert set(np.abs(table["valence"]).round(6)) == {0.8}
    else:
        for track in (first, second):  # once the window is full, +0.8 and -0.8 cancel
            np.testing.assert_allclose(track.iloc[smooth - 1:]["valence"].to_numpy(), 0, atol=1e-6)
        assert first.iloc[0]["valence"] == pytest.approx(0.8)  # the first reading is its own mean
    tracks = pd.read_csv(tmp_path / "out" / "tracks.csv")
    assert tracks["track"].tolist() == [1, 2] and tracks["main_expression"].tolist() == ["happy", "sad"]
    assert tracks.loc[0, "share_happy"] == 1.0 and tracks["frames"].tolist() == [len(first), len(second)]
    assert (tmp_path / "out" / "tracks.png").stat().st_size > 1000
    annotated = cv2.VideoCapture(str(tmp_path / "out" / "annotated.mp4"))
    assert int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == len(frames)


@needs_fer
def test_a_clip_through_the_cli_with_the_real_detector(tmp_path, capsys):
    from test_faces import retinaface_ready

    if not retinaface_ready():
        pytest.skip("RetinaFace weights not set up (`fer-tune weights retinaface`)")
    from fer_tune.engine.artifacts import export_best
    from fer_tune.model import create_model
    from fer_tune.specfile import load_spec
    from conftest import write_spec

    spec = load_spec(write_spec(tmp_path / "spec.yaml", model={"backbone": "test_resnet", "dropout": 0.1},
                                data={"source": "synthetic", "image_size": 48}))
    export_best(tmp_path / "run" / "best", spec, create_model(spec.model).state_dict(), list(range(8)))
    clip = make_clip(tmp_path / "clip.mp4")
    assert main(["predict", str(tmp_path / "run"), str(clip), "--out", str(tmp_path / "out"), "--detector",
                 "retinaface"]) == 0
    err = capsys.readouterr().err
    assert "30 frame(s) read" in err and "frames/s" in err and "2 track(s)" in err
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    counts = table.groupby("frame").size().reindex(range(FRAMES), fill_value=0).tolist()
    expected = [len(truth_boxes(f)) for f in range(FRAMES)]
    assert all(c <= e for c, e in zip(counts, expected))  # nothing found where there is no face
    assert sum(c == e for c, e in zip(counts, expected)) >= FRAMES - 2, counts  # a missed frame or two at most
    # a face missed for a frame keeps its track: two faces, two tracks
    assert sorted(set(table["track"])) == [1, 2] and table.groupby("track")["frame"].min().tolist()[0] == 0


def test_bad_video_arguments_are_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    cases = [([str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "o")], "no such video file"),
             ([str(tmp_path / "broken.mp4")], "need --out DIR")]
    for extra, expected in cases:
        assert main(["predict", str(tmp_path / "run"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


@needs_fer
def test_a_clip_interrupted_mid_way_keeps_the_rows_of_the_frames_read(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "clip.mp4")
    monkeypatch.setattr(video, "make_detector", lambda name, level_eyes=False: TruthDetector(1))
    net, calls = BrightnessNet(), []

    def stops_at_the_second_batch(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return net(images)

    stops_at_the_second_batch.image_size = 48
    with pytest.raises(KeyboardInterrupt):
        video.predict_video(stops_at_the_second_batch, clip, tmp_path / "out", progress=False)
    kept = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(kept) == calls[0] > 0  # the first batch's faces, written before the interruption


def test_a_video_without_faces_or_frames_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from fer_tune.errors import UserError

    monkeypatch.setattr(video, "make_detector", lambda name, level_eyes=False: TruthDetector(1))
    monkeypatch.setattr(video, "load_runtime", lambda model: BrightnessNet())
    empty = tmp_path / "empty.mp4"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (480, 270))
    writer.release()  # no frame written
    with pytest.raises(UserError, match="empty.mp4: (the video has no frames|not a video OpenCV can read)"):
        video.predict_video(BrightnessNet(), empty, tmp_path / "o1", progress=False)
    blank = tmp_path / "blank.mp4"
    writer = cv2.VideoWriter(str(blank), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (480, 270))
    for _ in range(5):
        writer.write(np.full((270, 480, 3), 90, np.uint8))
    writer.release()
    monkeypatch.setattr(video, "make_detector", lambda name, level_eyes=False: type("NoFaces", (), {
        "find": lambda self, rgb: []})())
    assert main(["predict", str(tmp_path), str(blank), "--out", str(tmp_path / "o2")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"no face found in any of them; wrote an empty {tmp_path / 'o2' / 'predictions.csv'} "
                            f"and {tmp_path / 'o2' / 'annotated.mp4'}")
    assert pd.read_csv(tmp_path / "o2" / "predictions.csv").empty
