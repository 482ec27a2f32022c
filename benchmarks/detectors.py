"""Face detectors on composed pictures with known faces: how many they find, and how fast.

    python benchmarks/detectors.py            # 20 pictures of 3 FER2013 faces each (../shared/data/fer2013-4k)
    python benchmarks/detectors.py --pictures 40 --threads 2

The pictures are tests/composed.py's: real FER2013 test faces pasted at 120-160 px on a noisy
background, so every true box is known. A detection matches a face at IoU >= 0.3 (each face and
each detection matched once); a detection matching no face is "off a face". Times are per picture,
detection only, on `--threads` CPU threads, after one warm-up picture.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2

from common import REPO, machine_header, markdown_table

sys.path.insert(0, str(REPO / "tests"))

from composed import iou, write_pictures  # noqa: E402

from fer_tune.data.faces import FaceDetector, RetinaFaceDetector, read_photo  # noqa: E402


def score(detector, pictures: dict) -> tuple[int, int, int, float]:
    """(faces found, faces, detections off a face, ms per picture)."""
    found = off = faces = 0
    seconds = 0.0
    detector.find(read_photo(next(iter(pictures))))  # warm-up
    for path, truth in pictures.items():
        rgb = read_photo(path)
        started = time.perf_counter()
        boxes = [(f.x, f.y, f.w, f.h) for f in detector.find(rgb)]
        seconds += time.perf_counter() - started
        faces += len(truth)
        unmatched = list(truth)
        for box in boxes:
            best = max(unmatched, key=lambda t: iou(box, t), default=None)
            if best is not None and iou(box, best) >= 0.3:
                unmatched.remove(best)
                found += 1
            else:
                off += 1
    return found, faces, off, 1000 * seconds / len(pictures)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each detector")
    args = parser.parse_args(argv)
    print(machine_header("Face detectors (benchmarks/detectors.py)"))
    cv2.setNumThreads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pictures = write_pictures(Path(tmp), args.pictures)
        retina = RetinaFaceDetector(threads=args.threads)
        rows = []
        for name, detector in (("haar (OpenCV defaults)", FaceDetector()), ("retinaface (fer-tune's loader)", retina)):
            found, faces, off, ms = score(detector, pictures)
            rows.append([name, f"{found} / {faces} ({found / faces:.2f})", off, f"{ms:.0f}"])
    print(f"{args.pictures} pictures of 3 FER2013 test faces each (120-160 px); IoU >= 0.3; {args.threads} thread(s)\n")
    print(markdown_table(["detector", "faces found", "detections off a face", "ms per picture"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
