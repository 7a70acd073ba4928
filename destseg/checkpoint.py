"""One self-describing checkpoint file per run, written atomically, read with ``weights_only=True``.

Contents: format version, library version, model name and config, teacher name, global step, stage, model
state (teacher included, so a run predicts with no weights download), optimizer state, and any extra
training state (the steps each stage trained, a model's best validation weights).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from destseg import __version__
from destseg.errors import CheckpointError

FORMAT_VERSION = 1
REQUIRED_KEYS = {"format_version", "library_version", "model", "config", "step", "model_state"}


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path | str, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename over ``path``:
    a crash at any point leaves either the old file or the new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: Path | str, payload: dict) -> None:
    payload = {"format_version": FORMAT_VERSION, "library_version": __version__, **payload}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path | str, expected_model: str | None = None) -> dict:
    """Load and check a checkpoint; every failure is a :class:`CheckpointError` saying what and why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global outside the allow-list before running it.
        raise CheckpointError(f"{path}: refused, the file holds objects other than tensors and plain data "
                              f"(unsafe or not a destseg checkpoint): {str(exc).splitlines()[0]}") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or not REQUIRED_KEYS <= set(ckpt):
        raise CheckpointError(f"{path}: not a destseg checkpoint (missing keys "
                              f"{sorted(REQUIRED_KEYS - set(ckpt) if isinstance(ckpt, dict) else REQUIRED_KEYS)})")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format_version']} (written by destseg "
                              f"{ckpt.get('library_version')}) is not supported by destseg {__version__}, "
                              f"which reads format {FORMAT_VERSION}")
    if expected_model is not None and ckpt["model"] != expected_model:
        raise CheckpointError(f"{path}: checkpoint is for model '{ckpt['model']}', not '{expected_model}'")
    return ckpt
