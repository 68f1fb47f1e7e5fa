"""Filtered leaky ReLU: bias, upsample, leaky ReLU, clamp, downsample (alias-free activation).

    x = x + b                                                   (per channel)
    x = upfirdn2d(x, fu, up=up, padding=padding, gain=up**2)    (no filtering when up == 1 and fu is None)
    x = clamp(leaky_relu(x, slope) * gain, -clamp, clamp)
    x = upfirdn2d(x, fd, down=down)                             (skipped when down == 1 and fd is None)

The padding belongs to the upsampling step. Both filters use the same `flip_filter`.

On the GPU this runs as that composition of our bias_act and upfirdn2d kernels (four
passes over memory, each a torch.library op with its own backward) rather than one
fused kernel: simpler to get right, and every derivative order comes for free.
"""

import math
from typing import Optional

import torch

from . import bias_act as bias_act_mod
from . import upfirdn2d as upfirdn2d_mod


def _check_args(x: torch.Tensor, b: Optional[torch.Tensor], up: int, down: int, clamp: Optional[float]):
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f'filtered_lrelu: x must be an NCHW tensor, got {tuple(getattr(x, "shape", ()))}')
    if b is not None and (b.ndim != 1 or b.shape[0] != x.shape[1]):
        raise ValueError(f'filtered_lrelu: b must have shape [{x.shape[1]}], got {tuple(b.shape)}')
    if not (isinstance(up, int) and up >= 1 and isinstance(down, int) and down >= 1):
        raise ValueError(f'filtered_lrelu: up and down must be integers >= 1, got up={up!r}, down={down!r}')
    if clamp is not None and clamp < 0:
        raise ValueError(f'filtered_lrelu: clamp must be >= 0 or None, got {clamp}')


def _filtered_lrelu_composed(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter, impl) -> torch.Tensor:
    """The composition of the module docstring; with impl='ref' it is the reference."""
    if b is not None:
        x = bias_act_mod.bias_act(x, b.to(x.dtype), impl=impl)
    if fu is not None or up > 1 or upfirdn2d_mod.parse_padding(padding) != (0, 0, 0, 0):
        x = upfirdn2d_mod.upfirdn2d(x, fu, up=up, padding=padding, flip_filter=flip_filter, gain=up ** 2, impl=impl)
    x = bias_act_mod.bias_act(x, act='lrelu', alpha=slope, gain=gain, clamp=clamp, impl=impl)
    if fd is not None or down > 1:
        x = upfirdn2d_mod.upfirdn2d(x, fd, down=down, flip_filter=flip_filter, impl=impl)
    return x


def filtered_lrelu(
    x: torch.Tensor,                    # Input [N, C, H, W], any float dtype.
    fu: Optional[torch.Tensor] = None,  # Upsampling filter (float32, from setup_filter), None = identity.
    fd: Optional[torch.Tensor] = None,  # Downsampling filter (float32, from setup_filter), None = identity.
    b: Optional[torch.Tensor] = None,   # Bias [C], added before upsampling; None = no bias.
    up: int = 1,                        # Upsampling factor.
    down: int = 1,                      # Downsampling factor.
    padding=0,                          # Padding of the upsampling step: int, (x, y) or (x0, x1, y0, y1); negative crops.
    gain: float = math.sqrt(2),         # Scale after the leaky ReLU.
    slope: float = 0.2,                 # Negative slope of the leaky ReLU.
    clamp: Optional[float] = None,      # Clamp after the gain to [-clamp, +clamp]; None = no clamp.
    flip_filter: bool = False,          # False = true convolution, True = correlation (both filters).
    impl: Optional[str] = None,         # None = CUDA kernels where possible, 'ref' = reference, 'cuda' = require CUDA tensors.
) -> torch.Tensor:
    """Bias, upsample, leaky ReLU, clamp, downsample; returns [N, C, H', W'] in x's dtype.

    H' = ((H * up + pady0 + pady1 - fu_h + 1) - fd_h) // down + 1, likewise W'.
    """
    _check_args(x, b, up, down, clamp)
    if impl not in (None, 'ref', 'cuda'):
        raise ValueError(f'filtered_lrelu: impl must be None, "ref" or "cuda", got {impl!r}')
    return _filtered_lrelu_composed(x, fu, fd, b, up, down, padding, float(gain), float(slope), clamp, flip_filter, impl)
