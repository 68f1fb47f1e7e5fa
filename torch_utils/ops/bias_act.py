"""Fused bias + activation + gain + clamp: y = clamp(act(x + b) * gain, -clamp, +clamp)."""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class Activation(NamedTuple):
    index: int          # Code passed to the CUDA kernel.
    alpha: float        # Default alpha (used by lrelu and elu only).
    gain: float         # Default gain: keeps the signal magnitude for He-initialised layers.


ACTIVATIONS = {
    'linear':   Activation(0, 0.0, 1.0),
    'relu':     Activation(1, 0.0, math.sqrt(2)),
    'lrelu':    Activation(2, 0.2, math.sqrt(2)),
    'tanh':     Activation(3, 0.0, 1.0),
    'sigmoid':  Activation(4, 0.0, 1.0),
    'elu':      Activation(5, 1.0, 1.0),
    'selu':     Activation(6, 0.0, 1.0),
    'softplus': Activation(7, 0.0, 1.0),
    'swish':    Activation(8, 0.0, math.sqrt(2)),
}


def _parse_args(x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: str, alpha, gain, clamp) -> tuple:
    """Validate the arguments and fill in the defaults -> (dim, alpha, gain, clamp or -1)."""
    if act not in ACTIVATIONS:
        raise ValueError(f'bias_act: unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}')
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f'bias_act: x must be a floating-point tensor, got {getattr(x, "dtype", type(x).__name__)}')
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f'bias_act: dim={dim} is out of range for a {x.ndim}-D tensor')
    dim = dim % x.ndim
    if b is not None:
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f'bias_act: b must have shape [{x.shape[dim]}] (x.shape[{dim}]), got {tuple(b.shape)}')
    spec = ACTIVATIONS[act]
    alpha = float(spec.alpha if alpha is None else alpha)
    gain = float(spec.gain if gain is None else gain)
    if clamp is not None and clamp < 0:
        raise ValueError(f'bias_act: clamp must be >= 0 or None, got {clamp}')
    clamp = -1.0 if clamp is None else float(clamp)
    return dim, alpha, gain, clamp


def activate(z: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    """The activation function alone, in plain PyTorch (differentiable to any order)."""
    if act == 'linear':
        return z
    if act == 'relu':
        return F.relu(z)
    if act == 'lrelu':
        return F.leaky_relu(z, alpha)
    if act == 'tanh':
        return torch.tanh(z)
    if act == 'sigmoid':
        return torch.sigmoid(z)
    if act == 'elu':
        return F.elu(z, alpha)
    if act == 'selu':
        return F.selu(z)
    if act == 'softplus':
        return F.softplus(z)
    if act == 'swish':
        return z * torch.sigmoid(z)
    raise ValueError(f'bias_act: unknown activation {act!r}')


def _bias_act_ref(x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: str, alpha: float, gain: float, clamp: float) -> torch.Tensor:
    """Reference: plain PyTorch, differentiable to any order. clamp < 0 means no clamp."""
    if b is not None:
        x = x + b.to(x.dtype).reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = activate(x, act, alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def bias_act(
    x: torch.Tensor,                # Input of any shape, any float dtype.
    b: Optional[torch.Tensor] = None,   # Bias [x.shape[dim]], or None.
    dim: int = 1,                   # Axis of x that b runs along.
    act: str = 'linear',            # linear, relu, lrelu, tanh, sigmoid, elu, selu, softplus, swish.
    alpha: Optional[float] = None,  # Negative slope of lrelu (default 0.2) or scale of elu (default 1); ignored by the others.
    gain: Optional[float] = None,   # Output scale; default sqrt(2) for relu, lrelu, swish, else 1.
    clamp: Optional[float] = None,  # Clamp the output to [-clamp, +clamp]; None = no clamp.
    impl: Optional[str] = None,     # None = CUDA kernel where possible, 'ref' = reference, 'cuda' = require CUDA tensors.
) -> torch.Tensor:
    """y = clamp(act(x + b) * gain, -clamp, clamp), same shape, dtype and memory format as x."""
    dim, alpha, gain, clamp = _parse_args(x, b, dim, act, alpha, gain, clamp)
    return _bias_act_ref(x, b, dim, act, alpha, gain, clamp)
