"""`fer-tune data synth`: the built-in synthetic faces written out as a `csv` dataset."""

from __future__ import annotations

from pathlib import Path

from fer_tune.data.synthetic import write_dataset
from fer_tune.errors import UserError
from fer_tune.io import check_writable


def synth(out: Path, n: int, size: int, seed: int, label_noise: float) -> Path:
    if n < 1:
        raise UserError(f"--n {n}: must be >= 1 (the number of faces to write)")
    if not 16 <= size <= 1024:
        raise UserError(f"--size {size}: must be between 16 and 1024 (pixels)")
    if not 0 <= label_noise <= 1:
        raise UserError(f"--label-noise {label_noise:g}: must be between 0 and 1 (the share of wrong labels)")
    check_writable(out)
    path = write_dataset(out, n=n, size=size, seed=seed, label_noise=label_noise)
    print(f"wrote {n} synthetic faces to {path} (use --set data.source=csv --set data.root={path})")
    return path
