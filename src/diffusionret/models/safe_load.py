"""Reading model files that may come from anyone, with the loaders that cannot run code first.

Order: safetensors (tensors only, by construction), then ``torch.load(weights_only=True)`` (a
restricted unpickler; before torch 2.6 it could be bypassed, CVE-2025-32434, so older versions are
refused), and TorchScript (``torch.jit.load``, which runs the archive's TorchScript code) only for
files that *are* TorchScript archives: a zip holding ``code/`` and ``constants.pkl``, which a plain
``torch.save`` zip never has.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import torch

# weights_only=True is a security boundary only from this version on.
MIN_SAFE_TORCH = (2, 6)


class UnsafeTorchError(RuntimeError):
    """The installed torch cannot load untrusted files safely."""


def torch_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``version`` (default: the installed torch), ``2.6.0+cu124`` -> ``(2, 6)``."""
    text = version if version is not None else torch.__version__
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def require_safe_torch() -> None:
    """Refuse to unpickle anything with a torch whose ``weights_only`` loading can be bypassed.

    Raises:
        UnsafeTorchError: torch is older than 2.6.
    """
    if torch_version() < MIN_SAFE_TORCH:
        raise UnsafeTorchError(
            f"torch {torch.__version__} cannot load model files safely (weights_only loading can be bypassed "
            f"before torch {'.'.join(map(str, MIN_SAFE_TORCH))}, CVE-2025-32434); upgrade: pip install 'torch>=2.6'"
        )


def torch_load_weights(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, after :func:`require_safe_torch`."""
    require_safe_torch()
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header starting with ``{``."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``), not merely a zip."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)
