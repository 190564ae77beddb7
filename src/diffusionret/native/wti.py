"""The compiled WTI reduction kernel (``wti_reduce.c``): load and call.

Built and cached by :mod:`diffusionret.native.build`; ``DIFFUSIONRET_NATIVE=0`` disables it (WTI
then reduces its score blocks with PyTorch ops, same numbers up to float rounding).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusionret.native.build import load_function, split_over_threads

SOURCE = "wti_reduce.c"

# Pointers travel as plain addresses (c_void_p from an int): a ctypes.cast per argument would cost
# more than reducing a small block.
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_ARGTYPES = [_I64, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _P, _P]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A bool tensor as contiguous uint8 (a view when it already is contiguous)."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t.to(torch.uint8)


@dataclass(frozen=True)
class WtiKernel:
    """A loaded ``wti_reduce.c``: WTI's maxima, zero floors and weighted sums in one pass, on CPU float32.

    Attributes:
        path: the shared library.
    """

    path: Path
    _function: ctypes._CFuncPtr

    def reduce(self, scores: torch.Tensor, offsets: torch.Tensor, text_w: torch.Tensor, text_floor: torch.Tensor,
               video_w: torch.Tensor, video_floor: torch.Tensor, out: torch.Tensor, out_rows: torch.Tensor,
               out_cols: torch.Tensor, *, threads: int = 1) -> None:
        """Write the WTI scores of A captions against B videos into ``out[out_rows][:, out_cols]``.

        Args:
            scores: (R, B T) float32, rows of unit token features against unit frame features, the
                rows of caption i being ``offsets[i]:offsets[i + 1]`` (its real tokens only), the
                columns of video b being ``b T:(b + 1) T``; rows may be strided, columns contiguous.
            offsets: (A + 1,) int64, non-decreasing, within 0..R.
            text_w: (R,) the softmax weight of each row's token.
            text_floor: (A,) bool, captions with padding (their max over tokens takes a 0 part).
            video_w: (B, T) frame weights, 0 on padded frames; video_floor: (B,) bool, videos with padding.
            out: (Nt, Nv) float32 with contiguous rows, written in place; out_rows (A,), out_cols (B,) int64.
            threads: captions are split over up to this many threads (the kernel itself is serial).
        """
        a, (b, frames) = text_floor.shape[0], video_w.shape
        r = scores.shape[0]
        if (scores.ndim != 2 or scores.shape[1] != b * frames or offsets.shape != (a + 1,) or text_w.shape != (r,)
                or video_floor.shape != (b,) or out_rows.shape != (a,) or out_cols.shape != (b,) or out.ndim != 2):
            raise ValueError(f"inconsistent shapes: scores {tuple(scores.shape)}, offsets {tuple(offsets.shape)}, "
                             f"text_w {tuple(text_w.shape)}, text_floor {tuple(text_floor.shape)}, video_w "
                             f"{tuple(video_w.shape)}, video_floor {tuple(video_floor.shape)}, out_rows "
                             f"{tuple(out_rows.shape)}, out_cols {tuple(out_cols.shape)}, out {tuple(out.shape)}")
        if scores.dtype != torch.float32 or out.dtype != torch.float32 or scores.stride(1) != 1 or out.stride(1) != 1:
            raise ValueError("scores and out must be float32 with contiguous rows")
        if any(t.device.type != "cpu" for t in (scores, out, offsets, text_w, video_w)):
            raise ValueError("the WTI kernel runs on CPU tensors only")
        if a == 0 or b == 0:
            return
        # Offsets and output indices are range-checked inside the kernel (a pass here per block
        # would cost more than the reduction of a small block).
        offsets, rows, cols = (t.to(torch.int64).contiguous() for t in (offsets, out_rows, out_cols))
        text_w = text_w.to(torch.float32).contiguous()
        video_w = video_w.to(torch.float32).contiguous()
        text_floor, video_floor = _bytes(text_floor), _bytes(video_floor)
        # A thread per million scores at most: starting threads costs more than reducing a small block.
        threads = min(threads, scores.numel() >> 20)

        def run(lo: int, hi: int) -> int:
            # Captions lo..hi: their offsets (absolute row numbers into scores) and output rows.
            return self._function(hi - lo, b, frames, scores.data_ptr(), scores.stride(0), r,
                                  offsets[lo:].data_ptr(), text_w.data_ptr(), text_floor[lo:].data_ptr(),
                                  video_w.data_ptr(), video_floor.data_ptr(), out.data_ptr(), out.stride(0),
                                  out.shape[0], out.shape[1], rows[lo:].data_ptr(), cols.data_ptr())

        codes = split_over_threads(run, a, threads)
        if 2 in codes:
            raise ValueError(f"offsets must rise from 0 to at most {r} (the rows of scores) and out_rows/out_cols "
                             f"must lie inside out {tuple(out.shape)}")
        if any(codes):
            raise MemoryError("the WTI kernel could not allocate its scratch memory")


def load_wti_kernel(directory: Path | None = None) -> WtiKernel | None:
    """The compiled kernel, building it on first use; None (logged) when it cannot be had.

    Args:
        directory: where built libraries are kept (default :func:`diffusionret.native.build.cache_dir`).
    """
    loaded = load_function(SOURCE, "diffusionret_wti_reduce", _ARGTYPES, "WTI reduces with PyTorch ops", directory)
    if loaded is None:
        return None
    target, function = loaded
    return WtiKernel(path=target, _function=function)
