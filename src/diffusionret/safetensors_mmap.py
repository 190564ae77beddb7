"""Memory-mapped reading and streamed writing of ``.safetensors`` files, without loading them whole.

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) and the raw,
C-contiguous, little-endian tensor bytes. Because the layout is that simple, a tensor can be mapped
at its offset: indexing rows then reads only the pages those rows live on, so a feature file larger
than RAM can feed training (the 180k-caption MSR-VTT text tokens are ~12 GB in float32), and a
search index's frame features stay on disk (:mod:`diffusionret.index.frame_store`). Training,
evaluation and the index reader all use it, so it sits below them. The writer streams tensors from
parts (shards) into one file, so merging shards never holds more than one part in memory either;
the result is an ordinary file that
``safetensors.safe_open`` / ``load_file`` read.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from diffusionret.config_utils import atomic_path

# safetensors dtype names <-> numpy / torch (the dtypes feature files use).
_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST = {torch.float32: "F32", torch.float16: "F16", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH = {name: dtype for dtype, name in _ST.items()}


def item_size(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (one of the dtypes feature files use, e.g. ``"F16"``)."""
    return np.dtype(_NP[dtype]).itemsize


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(tensors, metadata, data_start)`` of a ``.safetensors`` file.

    Raises:
        ValueError: naming the file, when it is truncated or its header is not valid JSON.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if length > size - 8:
            raise ValueError(f"{path}: truncated safetensors header ({length} bytes announced, file has {size})")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: unreadable safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: malformed safetensors header (data_offsets): {exc!r}") from exc
    if data_start + end > size:
        raise ValueError(f"{path}: truncated ({size} bytes, the header describes {data_start + end})")
    return header, dict(metadata), data_start


def mmap_tensors(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file as CPU tensors backed by a read-only-on-disk memory map.

    The map is copy-on-write (private): writing to a returned tensor changes this process's pages
    only, never the file. Resident memory grows with the rows actually read. The file is mapped
    once (``torch.from_file``), which keeps no file descriptor open, so an index of thousands of
    shards stays far below the open-file limit; a tensor whose offset is not a multiple of its
    element size (a writer that does not order tensors by alignment, e.g. :func:`write_streamed`)
    is mapped on its own with ``numpy.memmap`` instead, which holds one descriptor.

    Args:
        path: the file.
        names: the tensors to map (default: all).

    Raises:
        KeyError: a requested tensor is not in the file.
        ValueError: an unsupported dtype (e.g. bfloat16, which numpy cannot map).
    """
    path = Path(path)
    header, _meta, data_start = read_header(path)
    return mmap_from_header(path, header, data_start, names)


def mmap_from_header(path: str | os.PathLike, header: Mapping[str, Any], data_start: int,
                     names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """:func:`mmap_tensors` with the header already read (``read_header``'s tensors and data start)."""
    path = Path(path)
    out = {}
    whole: torch.Tensor | None = None
    for name in (list(header) if names is None else list(names)):
        if name not in header:
            raise KeyError(f"{path}: no tensor {name!r} (has {sorted(header)})")
        info = header[name]
        dtype = _NP.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which cannot be memory-mapped")
        begin, end = (int(x) for x in info["data_offsets"])
        shape = tuple(int(s) for s in info["shape"])
        if end == begin:  # numpy cannot map zero bytes
            out[name] = torch.from_numpy(np.zeros(shape, dtype=dtype))
            continue
        offset = data_start + begin
        if offset % np.dtype(dtype).itemsize == 0:
            if whole is None:
                whole = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
            out[name] = whole[offset:offset + end - begin].view(_TORCH[info["dtype"]]).view(shape)
            continue
        array = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
        out[name] = torch.from_numpy(array)
    return out


def write_streamed(path: str | os.PathLike, parts: Mapping[str, Sequence[Any]], metadata: Mapping[str, str],
                   load_part: Any) -> Path:
    """Write one ``.safetensors`` file whose tensors are concatenations (along dim 0) of parts.

    Args:
        path: the output (written atomically: temp file + rename).
        parts: ``{name: [part handle, ...]}`` in order; tensor ``name`` is ``cat([load_part(name, h) ...])``.
        metadata: string metadata stored in the header.
        load_part: ``(name, handle) -> torch.Tensor`` (CPU, contiguous); called twice per part (shapes
            first, bytes second), so it should be cheap (e.g. a memory map), and one part at a time is in memory.

    Returns:
        ``path``.
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, handles in parts.items():
        shapes = [tuple(load_part(name, h).shape) for h in handles]
        dtypes = {load_part(name, h).dtype for h in handles}
        if len(dtypes) != 1 or any(s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(f"{path}: parts of {name!r} disagree in dtype or trailing shape")
        dtype = dtypes.pop()
        rows = sum(s[0] for s in shapes)
        shape = (rows, *shapes[0][1:])
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so that the data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(blob)))
            handle.write(blob)
            for name, handles in parts.items():
                for h in handles:
                    handle.write(load_part(name, h).contiguous().numpy().tobytes())
    return path
