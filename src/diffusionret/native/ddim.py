"""The compiled DDIM re-ranking kernel (``ddim_rerank.c``): load and call.

Built and cached by :mod:`diffusionret.native.build` (keyed by source, compiler and CPU) and loaded
with :mod:`ctypes`, which releases the GIL during the call, so query rows can be split over threads.
``DIFFUSIONRET_NATIVE=0`` disables the kernel.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusionret.native.build import load_function, split_over_threads

SOURCE = "ddim_rerank.c"

_FLOAT_P = ctypes.POINTER(ctypes.c_float)
_I64_P = ctypes.POINTER(ctypes.c_int64)
_ARGTYPES = [ctypes.c_int64] * 5 + [_FLOAT_P, _FLOAT_P, _FLOAT_P, _I64_P, _FLOAT_P, _FLOAT_P, _FLOAT_P, _FLOAT_P,
                                    ctypes.c_float, _FLOAT_P, _FLOAT_P, _FLOAT_P, _FLOAT_P, ctypes.c_int, _FLOAT_P,
                                    _FLOAT_P]


def _ptr(tensor: torch.Tensor | None, kind: type = _FLOAT_P) -> ctypes._Pointer | None:
    return None if tensor is None else ctypes.cast(tensor.data_ptr(), kind)


@dataclass(frozen=True)
class DdimKernel:
    """A loaded ``ddim_rerank.c``: deterministic DDIM (eta 0) through a prepared denoiser, on CPU float32.

    Attributes:
        path: the shared library.
    """

    path: Path
    _function: ctypes._CFuncPtr

    def sample(self, logits: torch.Tensor, g: torch.Tensor, c: torch.Tensor, he: torch.Tensor, out_w: torch.Tensor,
               out_b: float, coefficients: dict[str, torch.Tensor], noise: torch.Tensor, *,
               cand_idx: torch.Tensor | None = None, mix: torch.Tensor | None = None,
               c_bias: torch.Tensor | None = None, clip: bool = True, threads: int = 1) -> torch.Tensor:
        """All S steps for B query rows; see :class:`~diffusionret.models.denoiser.PreparedDenoiser`.

        Args:
            logits: (B, S, N) the attention logits without ``x`` for every step.
            g, c: the candidates' decoder terms, one of
                (B, N, 2D) per (query, candidate);
                (M, 2D) banks, with ``cand_idx`` (B, N) naming each query's rows;
                (M, T, 2D) per-frame banks, with ``cand_idx`` and ``mix`` (B, N, T): a candidate's
                term is ``sum_t mix[b, n, t] bank[cand_idx[b, n], t]``, plus ``c_bias`` (2D,) for c.
            he: (S, 2D); out_w: (2D,); out_b: the decoder's output bias.
            coefficients: (S,) float32 tables ``sqrt_recip``, ``sqrt_recipm1``, ``sqrt_prev``, ``dir``
                (:meth:`GaussianDiffusion.ddim_coefficients` at eta 0).
            noise: (B, N) x_T.
            clip: clamp each predicted x0 to [-1, 1].
            threads: query rows are split over this many threads (the kernel itself is serial).
        Returns:
            (B, N) the final sample x0.
        """
        b, s, n = logits.shape
        d2 = he.shape[1]
        if noise.shape != (b, n) or he.shape[0] != s or out_w.shape != (d2,):
            raise ValueError(f"inconsistent shapes: logits {tuple(logits.shape)}, noise {tuple(noise.shape)}, "
                             f"he {tuple(he.shape)}, out_w {tuple(out_w.shape)}")
        if c.shape != g.shape or g.shape[-1] != d2:
            raise ValueError(f"g {tuple(g.shape)} and c {tuple(c.shape)} must have the same shape, last dim {d2}")
        if cand_idx is None:
            if g.shape != (b, n, d2) or mix is not None:
                raise ValueError(f"without cand_idx, g and c must be ({b}, {n}, {d2}) and mix None")
            frames = 1
        else:
            if cand_idx.shape != (b, n):
                raise ValueError(f"cand_idx {tuple(cand_idx.shape)} must be ({b}, {n})")
            frames = 1 if mix is None else g.shape[1]
            want = (b, n, frames)
            if (mix is None and g.ndim != 2) or (mix is not None and (g.ndim != 3 or mix.shape != want)):
                raise ValueError(f"banks g {tuple(g.shape)} and mix {None if mix is None else tuple(mix.shape)} do not "
                                 f"match: (M, 2D) without mix, (M, T, 2D) with a (B, N, T) mix")
            cand_idx = cand_idx.to(torch.int64).contiguous()
        if c_bias is not None and (mix is None or c_bias.shape != (d2,)):
            raise ValueError("c_bias goes with a per-frame bank (mix) and must be (2D,)")
        floats = [None if t is None else t.detach().to(torch.float32).contiguous()
                  for t in (logits, g, c, he, out_w, noise, mix, c_bias)]
        logits, g, c, he, out_w, noise, mix, c_bias = floats
        if any(t is not None and t.device.type != "cpu" for t in [*floats, cand_idx]):
            raise ValueError("the DDIM kernel runs on CPU tensors only")
        coef = [coefficients[k].to(torch.float32).contiguous() for k in ("sqrt_recip", "sqrt_recipm1", "sqrt_prev", "dir")]
        out = torch.empty(b, n, dtype=torch.float32)
        if b == 0:
            return out

        def run(lo: int, hi: int) -> int:
            # Pointers into rows lo..hi of the per-row tensors; banks and tables are shared.
            banks = (g[lo:hi], c[lo:hi]) if cand_idx is None else (g, c)
            rows = (None, None) if cand_idx is None else (cand_idx[lo:hi], None if mix is None else mix[lo:hi])
            return self._function(hi - lo, n, s, d2, frames, _ptr(logits[lo:hi]), _ptr(banks[0]), _ptr(banks[1]),
                                  _ptr(rows[0], _I64_P), _ptr(rows[1]), _ptr(c_bias), _ptr(he), _ptr(out_w),
                                  float(out_b), *(_ptr(t) for t in coef), int(clip), _ptr(noise[lo:hi]),
                                  _ptr(out[lo:hi]))

        if any(split_over_threads(run, b, threads)):
            raise MemoryError("the DDIM kernel could not allocate its scratch memory")
        return out


def load_ddim_kernel(directory: Path | None = None) -> DdimKernel | None:
    """The compiled kernel, building it on first use; None (logged) when it cannot be had.

    Args:
        directory: where built libraries are kept (default :func:`diffusionret.native.build.cache_dir`).
    """
    loaded = load_function(SOURCE, "diffusionret_ddim_rerank", _ARGTYPES, "re-ranking uses the PyTorch DDIM loop", directory)
    if loaded is None:
        return None
    target, function = loaded
    return DdimKernel(path=target, _function=function)
