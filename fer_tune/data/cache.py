"""Decode and resize every image of a split once, into a uint8 array reused by every epoch and trial.

The cache is a `.npy` file opened memory-mapped, so concurrent trials on one machine share the
page cache instead of each holding a copy. Its name carries a fingerprint of the split table,
the source and the image size, so a changed dataset never reuses a stale cache.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from fer_tune.data.images import BadImage
from fer_tune.data.sources import read_image
from fer_tune.data.splits import table_fingerprint
from fer_tune.errors import UserError, one_line
from fer_tune.io import atomic_save_npy


def cache_path(cache_dir: Path, split: str, data_spec, table: pd.DataFrame) -> Path:
    key = f"{data_spec.source}|{data_spec.root}|{data_spec.image_size}|{table_fingerprint(table)}"
    if data_spec.source == "synthetic":
        key += f"|{data_spec.synthetic.model_dump_json()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{split}_{data_spec.image_size}px_{digest}.npy"


def load_images(data_spec, table: pd.DataFrame, split: str, cache_dir: Path,
                progress: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """Return (images (N, S, S, 3) uint8, table of the rows kept). Builds the cache on first use."""
    path = cache_path(cache_dir, split, data_spec, table)
    kept_path = path.with_suffix(".kept.npy")
    for attempt in range(2):
        if not kept_path.exists():  # written last: its presence means the cache is complete
            with _build_lock(path):
                if not kept_path.exists():  # another process may have built it while we waited
                    _build(data_spec, table, split, path, kept_path, progress)
        images, kept, problem = _open(path, kept_path, len(table), data_spec.image_size)
        if problem is None:
            return images, table.iloc[kept].reset_index(drop=True)
        if attempt == 0:
            print(f"note: the image cache {path} is damaged ({problem}); building it again", flush=True)
            with _build_lock(path):
                if _open(path, kept_path, len(table), data_spec.image_size)[2] is not None:  # not rebuilt meanwhile
                    kept_path.unlink(missing_ok=True)
                    path.unlink(missing_ok=True)
    raise UserError(f"{path}: the image cache is still damaged after a rebuild ({problem}); delete "
                    f"{path.parent} and run again")


def _open(path: Path, kept_path: Path, rows: int, size: int):
    """(images, kept rows, None), or (None, None, what is wrong): a cache file that was truncated,
    edited or swapped never silently gives other images or misaligned labels."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
        kept = np.load(kept_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        return None, None, f"unreadable: {one_line(err, 100)}"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        return None, None, f"images {images.dtype} {images.shape}, expected uint8 (N, {size}, {size}, 3)"
    if kept.ndim != 1 or not np.issubdtype(kept.dtype, np.integer) or len(kept) != len(images):
        return None, None, f"{len(kept)} row numbers for {len(images)} images"
    if len(kept) and (kept.min() < 0 or kept.max() >= rows or np.any(np.diff(kept) <= 0)):
        return None, None, f"row numbers outside the split's {rows} rows or out of order"
    return images, kept, None


@contextmanager
def _build_lock(path: Path):
    """One builder per cache file: the training workers of one node wait for it instead of all
    decoding the same images at once (a node-local cache is built by its first worker)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(data_spec, table: pd.DataFrame, split: str, path: Path, kept_path: Path, progress: bool) -> None:
    """Decode every image of the split once, straight into a memory-mapped .npy on disk.

    The array is never held in memory whole: an AffectNet split at 224 px is tens of GB. Images are
    decoded by as many threads as this process may use cores (PIL and OpenCV release the GIL while
    they decode and resize); the file is renamed into place only once it is complete.
    """
    size = data_spec.image_size
    started = time.perf_counter()
    partial, compact = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.compact")
    images = reserved_memmap(partial, (len(table), size, size, 3))
    bad: list[tuple[int, BadImage]] = []

    def decode(i: int) -> None:
        try:
            image = read_image(data_spec, table.iloc[i], size=size)
        except BadImage as err:
            bad.append((i, err))
            return
        if image.shape[:2] != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        images[i] = image

    threads = decode_threads()
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(tqdm(pool.map(decode, range(len(table))), total=len(table), disable=None if progress else True,
                      desc=f"caching {split} images at {size}px ({threads} threads)", unit="img", leave=False))
        bad.sort(key=lambda item: item[0])
        if bad and not data_spec.skip_bad:
            listed = "; ".join(f"{err.path} ({err.reason})" for _, err in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise UserError(f"{len(bad)} unreadable image(s) in the {split} split: {listed}{more}; "
                            f"fix or remove them, or set data.skip_bad: true to skip them")
        kept = np.setdiff1d(np.arange(len(table)), np.asarray([i for i, _ in bad], dtype=int))
        if bad:
            print(f"skipped {len(bad)} unreadable image(s) in the {split} split (data.skip_bad)")
        if len(kept) == 0:
            raise UserError(f"no readable images in the {split} split")
        if len(kept) < len(table):  # close the gaps, a chunk at a time
            out = reserved_memmap(compact, (len(kept), size, size, 3))
            for start in range(0, len(kept), 4096):
                out[start:start + 4096] = images[kept[start:start + 4096]]
            out.flush()
            del out
            del images
            os.replace(compact, partial)
        else:
            images.flush()
            del images
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        compact.unlink(missing_ok=True)
    atomic_save_npy(kept_path, kept)  # last: its presence says the cache is complete
    seconds = time.perf_counter() - started
    if progress and len(table) >= 1000:
        print(f"cached {len(kept)} {split} images at {size}px in {seconds:.1f} s ({len(kept) / seconds:.0f} "
              f"images/s, {threads} threads, {path.stat().st_size / 2**20:.0f} MiB at {path})", flush=True)


def reserved_memmap(path: Path, shape: tuple) -> np.ndarray:
    """A uint8 .npy memory map whose disk space is reserved up front: a disk too small fails here
    with ENOSPC (one line from the CLI), not later with SIGBUS while the map is written."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without it: written as they go
                del images
                path.unlink(missing_ok=True)
                raise OSError(err.errno, err.strerror, str(path)) from None
    return images


def decode_threads() -> int:
    """Threads that decode images: the cores this process may use (its affinity), at most 32."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(32, cores))
