"""Build, cache, load and call the optional C kernels of this package (nothing here is required).

A kernel's C source is compiled once per source, compiler and CPU into a shared library under the
user's cache directory (``$DIFFUSIONRET_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffusionret`` or
``~/.cache/diffusionret``), written atomically (temp file, then rename), and loaded with
:mod:`ctypes` (which releases the GIL during a call). A failed build leaves a ``.failed`` note next
to it so that later processes do not retry it; delete the note to retry. ``DIFFUSIONRET_NATIVE=0``
disables every kernel: callers then use their PyTorch equivalent.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from diffusionret.config_utils import atomic_write_text

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

log = logging.getLogger(__name__)

ENV_SWITCH = "DIFFUSIONRET_NATIVE"
ENV_CACHE = "DIFFUSIONRET_CACHE_DIR"
#: Tried in order; the first that compiles is kept. -march=native: the library is keyed by the CPU.
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
COMPILE_TIMEOUT_S = 120.0


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffusionret"


def native_enabled() -> bool:
    """False when ``DIFFUSIONRET_NATIVE`` switches the kernels off (0, false, no, off)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


# Memoised lookups. Every search query loads its WTI kernel through load_library, and reading
# /proc/cpuinfo and scanning PATH were most of that cost (0.1-1 ms per call, more with many cores);
# a caller-held handle would have to be threaded through every WTI entry point instead. Only inputs
# that cannot change under a running process, or are named by their own key, are memoised: the CPU
# (a -march=native build is keyed by it), a compiler lookup keyed by $CC and $PATH (a compiler
# installed or removed while a process runs is seen by the next process), where a package source
# lives, and the ctypes handle of a built library's path (whose name carries the source digest).
# The source itself is read and hashed on every call, and the library and its ``.failed`` note are
# looked up on disk every time, so an edited source never reuses a stale build.


def _compiler() -> str | None:
    return _find_compiler(os.environ.get("CC"), os.environ.get("PATH"))


@functools.lru_cache(maxsize=16)
def _find_compiler(cc: str | None, search_path: str | None) -> str | None:
    """The first C compiler found among ``cc``, cc, gcc, clang on ``search_path`` (memoised, see above)."""
    for name in (cc, "cc", "gcc", "clang"):
        if name and (path := shutil.which(name, path=search_path)):
            return path
    return None


@functools.cache
def _source_file(source_name: str) -> Traversable:
    """Where the package keeps the C file ``source_name`` (memoised: the package does not move)."""
    return resources.files("diffusionret.native").joinpath(source_name)


@functools.lru_cache(maxsize=16)
def _open_library(path: str) -> ctypes.CDLL:
    """``ctypes.CDLL(path)``, memoised like the dynamic loader itself, which hands back the library
    it already mapped for a path (a built library's name carries its source digest, so one path
    always holds the same build); a fresh CDLL would rebuild its function-pointer class per call."""
    return ctypes.CDLL(path)


@functools.cache
def _cpu_signature() -> str:
    """The CPU's model and feature flags (a -march=native build must not move to another CPU); memoised."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keys}))


def _build(source_name: str, source: bytes, compiler: str, target: Path) -> None:
    """Compile ``source`` into ``target`` (atomically), trying :data:`FLAG_SETS` in order."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / source_name
        src.write_bytes(source)
        errors = []
        for flags in FLAG_SETS:
            out = Path(tmp) / target.name
            cmd = [compiler, *flags, "-shared", "-fPIC", "-o", str(out), str(src), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if proc.returncode == 0:
                os.replace(out, target)
                return
            errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-2000:]}")
        raise RuntimeError("\n".join(errors))


def load_library(source_name: str, fallback: str, directory: Path | None = None) -> tuple[Path, ctypes.CDLL] | None:
    """The compiled ``source_name`` (a C file of this package) and its path, built on first use.

    Args:
        source_name: e.g. ``"ddim_rerank.c"``.
        fallback: what the caller does instead, for the log (e.g. "re-ranking uses the PyTorch DDIM loop").
        directory: where built libraries are kept (default :func:`cache_dir`).
    Returns:
        ``(path, library)``, or None (logged) when the kernel is switched off or cannot be had.
    """
    stem = source_name.rsplit(".", 1)[0]
    if not native_enabled():
        log.debug("native kernel %s disabled by %s", stem, ENV_SWITCH)
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found: %s", fallback)
        return None
    source = _source_file(source_name).read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), repr(FLAG_SETS).encode(),
                                     platform.machine().encode(), _cpu_signature().encode()])).hexdigest()[:20]
    directory = directory or cache_dir()
    target = directory / f"{stem}-{key}.so"
    failed = target.with_suffix(".failed")
    if failed.exists():
        log.debug("native kernel %s: an earlier build failed (%s); %s", stem, failed, fallback)
        return None
    try:
        if not target.exists():
            log.info("building the native kernel %s with %s into %s", stem, compiler, target)
            _build(source_name, source, compiler, target)
        library = _open_library(str(target))
    except subprocess.TimeoutExpired as exc:  # a slow (loaded) machine, not a broken build: retry next time
        log.warning("native kernel %s not built in time (%s); %s", stem, exc, fallback)
        return None
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("native kernel %s unavailable (%s); %s", stem, exc, fallback)
        try:
            atomic_write_text(failed, str(exc))
        except OSError:
            pass
        return None
    return target, library


def load_function(source_name: str, symbol: str, argtypes: list, fallback: str,
                  directory: Path | None = None) -> tuple[Path, ctypes._CFuncPtr] | None:
    """One C function of the compiled ``source_name`` with its argument types set (``int`` result).

    Args:
        source_name: the C file, as for :func:`load_library`.
        symbol: the exported function, e.g. ``"diffusionret_wti_reduce"``.
        argtypes: its ``ctypes`` argument types.
        fallback: what the caller does instead, for the log.
        directory: where built libraries are kept (default :func:`cache_dir`).
    Returns:
        ``(path of the library, function)``, or None (logged) when the kernel cannot be had.
    """
    loaded = load_library(source_name, fallback, directory)
    if loaded is None:
        return None
    target, library = loaded
    function = getattr(library, symbol)
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return target, function


def split_over_threads(call: Callable[[int, int], int], rows: int, threads: int) -> list[int]:
    """``call(lo, hi)`` on contiguous blocks of ``rows`` rows, over up to ``threads`` threads.

    A kernel's call releases the GIL (:mod:`ctypes`), so the blocks run in parallel; one thread
    calls ``call(0, rows)`` directly. Returns the kernels' result codes, in block order.
    """
    threads = max(1, min(threads, rows))
    if threads == 1:
        return [call(0, rows)]
    bounds = [rows * i // threads for i in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(call, bounds[:-1], bounds[1:]))
