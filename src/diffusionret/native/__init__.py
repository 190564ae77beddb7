"""Optional compiled kernels, built on first use with the system C compiler (nothing is required).

Every kernel here has a PyTorch equivalent that is used whenever the kernel cannot be built or
loaded (no compiler, an unsupported platform, ``DIFFUSIONRET_NATIVE=0``).
"""

from diffusionret.native.ddim import DdimKernel, load_ddim_kernel
from diffusionret.native.wti import WtiKernel, load_wti_kernel

__all__ = ["DdimKernel", "WtiKernel", "load_ddim_kernel", "load_wti_kernel"]
