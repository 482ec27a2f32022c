"""Video throughput and the README's figures: a clip of two real FER2013 faces moving across a
canvas (made here, as tests/test_video.py makes it), read by `fer-tune predict MODEL clip.mp4`.

    python benchmarks/video_demo.py --model runs/my_fer2013_model
    python benchmarks/video_demo.py --model MODEL --frames 120 --figures benchmarks/figures

Prints frames per second (detection and network apart) on this machine. With --figures, writes
video_frame.png (one annotated frame; the faces are blurred, since FER2013's images are not
copied into the project, the boxes, labels and dials are as `predict` draws them) and
video_tracks.png (valence and arousal of each track over time, as `predict` writes tracks.png).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import pandas as pd

from common import REPO, machine_header

sys.path.insert(0, str(REPO / "tests"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=30, help="frames of the clip (10 fps)")
    parser.add_argument("--detector", default="auto")
    parser.add_argument("--figures", type=Path, help="write video_frame.png and video_tracks.png here")
    args = parser.parse_args(argv)

    import test_video
    from fer_tune.commands.predict import annotate
    from fer_tune.commands.video import predict_video, summarize_video
    from fer_tune.engine.runtime import load_runtime

    print(machine_header("Video (benchmarks/video_demo.py)"))
    test_video.FRAMES = args.frames
    with tempfile.TemporaryDirectory() as tmp:
        clip = test_video.make_clip(Path(tmp) / "clip.mp4")
        result = predict_video(load_runtime(args.model), clip, Path(tmp) / "out", detector_name=args.detector,
                               progress=False)
        print(summarize_video(result, clip, Path(tmp) / "out"))
        if args.figures:
            args.figures.mkdir(parents=True, exist_ok=True)
            table = pd.read_csv(Path(tmp) / "out" / "predictions.csv")
            frame = int(table.groupby("frame").size().idxmax())  # a frame with both faces
            capture = cv2.VideoCapture(str(clip))
            capture.set(cv2.CAP_PROP_POS_FRAMES, frame)
            rgb = cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB)
            rows = table[table["frame"] == frame].to_dict("records")
            for row in rows:
                x, y, w, h = (int(row[k]) for k in ("x", "y", "w", "h"))
                rgb[y:y + h, x:x + w] = cv2.GaussianBlur(rgb[y:y + h, x:x + w], (0, 0), 9)
            shown = annotate(rgb, [{**r, "label": f"#{r['track']} "} for r in rows])
            cv2.imwrite(str(args.figures / "video_frame.png"), cv2.cvtColor(shown, cv2.COLOR_RGB2BGR))
            shutil.copy(Path(tmp) / "out" / "tracks.png", args.figures / "video_tracks.png")
            print(f"wrote {args.figures / 'video_frame.png'} (frame {frame}) and {args.figures / 'video_tracks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
