"""`fer-tune data faces`: crop the largest face of every photo in a folder, keeping its folder structure."""

from __future__ import annotations

from pathlib import Path

import cv2
import pandas as pd

from fer_tune.data.faces import DEFAULT_MARGIN, check_margin, crop_face, make_detector, read_photo
from fer_tune.data.images import IMAGE_EXTENSIONS, BadImage, list_images, pil_format
from fer_tune.errors import UserError
from fer_tune.io import atomic_write, check_writable


def crop_folder(src: Path, dst: Path, margin: float = DEFAULT_MARGIN, size: int = 224,
                level_eyes: bool = False, progress: bool = True, detector: str = "auto") -> pd.DataFrame:
    """Crop the largest face of every image under `src` into `dst`, at the same relative path.

    A class-folder dataset stays one. Images without a face and unreadable files are skipped and
    listed, with every crop's source box, in `dst/faces.csv`; the table is also returned.
    """
    from PIL import Image
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    _check_crop_args(src, dst, margin, size)
    images = list_images(src)
    if not images:
        raise UserError(f"{src}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below it")
    detector = make_detector(detector, level_eyes=level_eyes)
    rows = []
    for path in tqdm(images, desc="finding faces", unit="img", disable=None if progress else True):
        rel = path.relative_to(src).as_posix()
        row = {"image": rel, "crop": "", "status": "face", "faces": 0, "x": None, "y": None,
               "w": None, "h": None, "angle": None, "reason": ""}
        try:
            rgb = read_photo(path)
        except BadImage as err:
            rows.append({**row, "status": "unreadable", "reason": err.reason})
            continue
        faces = detector.find(rgb)
        if not faces:
            rows.append({**row, "status": "no face"})
            continue
        face = faces[0]
        crop = crop_face(rgb, face, margin)
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if crop.shape[0] >= size
                          else cv2.INTER_CUBIC)
        out = dst / rel
        atomic_write(out, lambda tmp: Image.fromarray(crop).save(tmp, format=pil_format(out), quality=95))
        rows.append({**row, "crop": rel, "faces": len(faces), "x": face.x, "y": face.y, "w": face.w,
                     "h": face.h, "angle": round(face.angle, 2)})
    table = pd.DataFrame(rows)
    atomic_write(dst / "faces.csv", lambda tmp: table.to_csv(tmp, index=False))
    return table


def summarize_crops(table: pd.DataFrame, dst: Path) -> str:
    """What `fer-tune data faces` prints: counts, and the first images that gave no crop."""
    status = table["status"].value_counts()
    lines = [f"cropped {status.get('face', 0)} of {len(table)} images into {dst} "
             f"({status.get('no face', 0)} without a face, {status.get('unreadable', 0)} unreadable); "
             f"every image's result is in {Path(dst) / 'faces.csv'}"]
    for kind in ("no face", "unreadable"):
        listed = table[table["status"] == kind]
        for row in listed.head(5).itertuples():
            lines.append(f"  {kind}: {row.image}" + (f" ({row.reason})" if row.reason else ""))
        if len(listed) > 5:
            lines.append(f"  ... and {len(listed) - 5} more {kind}")
    return "\n".join(lines)


def _check_crop_args(src: Path, dst: Path, margin: float, size: int) -> None:
    if not src.is_dir():
        raise UserError(f"--in {src}: {'is a file' if src.exists() else 'does not exist'}; "
                        f"give the folder of photos to crop")
    check_margin(margin)
    if not 16 <= size <= 1024:
        raise UserError(f"--size {size}: must be between 16 and 1024 (pixels of the square crops)")
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real == src_real or src_real in dst_real.parents:
        raise UserError(f"--out {dst}: is inside --in {src}; crops would mix with the photos, choose "
                        f"a folder outside it")
    check_writable(dst)
