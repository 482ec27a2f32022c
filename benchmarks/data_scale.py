"""Data at scale: preparing FER2013's whole Training split (28,709 faces), measured; AffectNet at
224 px on paper, from measured per-image rates.

    python benchmarks/data_scale.py                     # ../shared/data/fer2013, 48 px
    python benchmarks/data_scale.py --size 64 --sample 400

Each step runs in a fresh subprocess (so its peak memory is its own): `prepare_data` + building
the train and val caches of `data.source=folder` on ../shared/data/fer2013 (wall, images/s, peak
RSS, cache size on disk), then loading them again (a second trial's view: no image is decoded).
Then the per-image cost of an AffectNet-like image: `--sample` FER2013 faces re-encoded as
500x500 JPEGs (AffectNet's images are mostly 300-1,000 px), decoded and resized to 224 px, on one
thread and on all; from that rate, the cost of AffectNet's ~290,000 training images at 224 px.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine_header, markdown_table

FER2013_FULL = REPO.parent / "shared" / "data" / "fer2013"
AFFECTNET_TRAIN = 287_651  # AffectNet's manually annotated training set (Mollahosseini et al. 2017)

STEP = r"""
import json, resource, sys, time
from pathlib import Path
from fer_tune.data.prepare import prepare_data
from fer_tune.spec import validate_spec
root, size, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
spec = validate_spec({"data": {"source": "folder", "root": root, "image_size": size,
                               "split": {"val": 0.1, "test": 0.1, "seed": 0}}})
started = time.perf_counter()
prepared = prepare_data(spec.data, out)
counts = {name: len(prepared.load(name, progress=False)) for name in ("train", "val")}
seconds = time.perf_counter() - started
disk = sum(p.stat().st_size for p in (out / "cache").glob("*.npy"))
print(json.dumps({"seconds": seconds, "images": sum(counts.values()), "counts": counts, "disk": disk,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def step(root: Path, size: int, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP, str(root), str(size), str(out)], capture_output=True,
                          text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def affectnet_like_rate(sample: int, threads: int) -> float:
    """Images/s decoding 500x500 JPEGs and resizing them to 224 px, on `threads` threads."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    from PIL import Image

    from fer_tune.data.images import read_rgb

    faces = sorted((FER2013_FULL / "test").glob("*/*.jpg"))[:sample]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, face in enumerate(faces):
            path = Path(tmp) / f"{i}.jpg"
            Image.open(face).convert("RGB").resize((500, 500), Image.BICUBIC).save(path, quality=90)
            paths.append(path)

        def decode(path):
            return cv2.resize(read_rgb(path), (224, 224), interpolation=cv2.INTER_AREA)

        cv2.setNumThreads(1)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(decode, paths))
        return len(paths) / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=FER2013_FULL)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--sample", type=int, default=400)
    args = parser.parse_args(argv)
    print(machine_header("Data at scale (benchmarks/data_scale.py)"))
    if not (args.root / "train").is_dir():
        print(f"skipped: no dataset at {args.root}")
        return 0
    from fer_tune.data.cache import decode_threads

    with tempfile.TemporaryDirectory() as tmp:
        first = step(args.root, args.size, Path(tmp) / "run")
        again = step(args.root, args.size, Path(tmp) / "run")  # caches and splits reused
    rows = [["build (decode, resize, cache)", first["images"], f"{first['seconds']:.1f}",
             f"{first['images'] / first['seconds']:.0f}", f"{first['peak_rss'] / 2**20:.0f}",
             f"{first['disk'] / 2**20:.0f}"],
            ["reuse (a second trial, same node)", again["images"], f"{again['seconds']:.1f}",
             f"{again['images'] / again['seconds']:.0f}", f"{again['peak_rss'] / 2**20:.0f}",
             f"{again['disk'] / 2**20:.0f}"]]
    print(f"{args.root} train split, {args.size} px: {first['counts']} (test held apart); "
          f"{decode_threads()} decode threads\n")
    print(markdown_table(["step", "images", "seconds", "images/s", "peak RSS (MiB)", "cache on disk (MiB)"], rows))
    one, many = affectnet_like_rate(args.sample, 1), affectnet_like_rate(args.sample, decode_threads())
    disk = AFFECTNET_TRAIN * 224 * 224 * 3
    print(f"\nAffectNet-like images (500x500 JPEG -> 224 px): {one:.0f} images/s on 1 thread, {many:.0f} on "
          f"{decode_threads()}")
    print(f"AffectNet on paper ({AFFECTNET_TRAIN:,} training images at 224 px): cache {disk / 2**30:.1f} GiB on "
          f"each node's disk; build {AFFECTNET_TRAIN / many / 60:.0f} min on {decode_threads()} threads here "
          f"({AFFECTNET_TRAIN / one / 3600:.1f} h on one; if it scales with cores, "
          f"{AFFECTNET_TRAIN / (one * 16) / 60:.0f} min on 16); memory: the cache is memory-mapped, so a "
          f"worker's resident memory stays near the peak above while the page cache holds what fits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
