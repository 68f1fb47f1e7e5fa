"""Fused bias + activation + gain + clamp: y = clamp(act(x + b) * gain, -clamp, +clamp).

Two implementations: `_bias_act_ref` (plain PyTorch, defines the maths) and the CUDA
kernel in bias_act.cu, registered as the torch.library ops `next3d::bias_act` and
`next3d::bias_act_grad`. The op's backward calls the gradient op (one fused pass); the
gradient op's own backward, needed for R1's second derivatives, is written in plain
PyTorch from closed-form second derivatives (`_activate_grad2`), so derivatives of any
order exist. On CPU tensors the ops run a PyTorch twin of the kernel, so the op layer
(autograd formulas, fake kernels, torch.compile) can be tested without a GPU. torch.compile
traces the ops; eager mode runs the same bodies and formulas as autograd Functions, which
cost less per call.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import _build

SOURCES = ('bias_act.cpp', 'bias_act.cu')
SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
SOFTPLUS_THRESHOLD = 20.0   # F.softplus is the identity above this.


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


SCALE_COMMUTING = ('linear', 'relu', 'lrelu')     # act(gain * z) = gain * act(z) for gain > 0


def commutes_with_gain(act: str, gain: float) -> bool:
    """Whether act(z) * gain = act(z * gain): one of SCALE_COMMUTING and a positive gain."""
    return act in SCALE_COMMUTING and gain > 0


def activate_in_place(z: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    """One of SCALE_COMMUTING applied to z in place (z itself; no graph through a leaf)."""
    if act == 'lrelu':
        return F.leaky_relu_(z, alpha)
    if act == 'relu':
        return F.relu_(z)
    return z


def _bias_act_ref(x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: str, alpha: float, gain: float, clamp: float) -> torch.Tensor:
    """Reference: plain PyTorch, differentiable to any order. clamp < 0 means no clamp.

    linear, relu and lrelu commute with a positive scale: act(x + b) * gain = act(gain * x
    + gain * b), computed as one fused add and the activation in place (whose backward
    needs only its output), i.e. two passes over x instead of four (on the CPU, where
    this is what runs, a memory-bound op should cost little more than reading and
    writing x once).
    """
    shape = [-1 if i == dim else 1 for i in range(x.ndim)]
    if commutes_with_gain(act, gain):
        if b is not None and torch.compiler.is_compiling():
            # Inductor fuses the two passes itself, and drops add's alpha when it rewrites
            # add(b, mm(...), alpha) as an addmm (pytorch/pytorch#167313): no alpha there.
            x = x * gain + (b.to(x.dtype) * gain).reshape(shape)
        elif b is not None:
            x = torch.add((b.to(x.dtype) * gain).reshape(shape), x, alpha=gain)
        elif gain != 1:
            x = x * gain
        elif act != 'linear':
            x = x.clone()                       # the activation below works in place
        x = activate_in_place(x, act, alpha)
    else:
        if b is not None:
            x = x + b.to(x.dtype).reshape(shape)
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
    if _build.want_kernel('bias_act', impl, x, b) and _build.kernel_available('bias_act', SOURCES, x.device):
        if act == 'linear' and b is None and gain == 1 and clamp < 0:
            return x
        return _bias_act_call(x, None if b is None else b.to(x.dtype), dim, act, alpha, gain, clamp)
    return _bias_act_ref(x, b, dim, act, alpha, gain, clamp)


# ---------------------------------------------------------------------------------------
# The torch.library ops.

def _activate_grad(z: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    """d act / dz in closed form (the same formulas as activate_grad in bias_act.cu)."""
    if act == 'linear':
        return torch.ones_like(z)
    if act == 'relu':
        return (z > 0).to(z.dtype)
    if act == 'lrelu':
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, alpha))
    if act == 'tanh':
        return 1 - torch.tanh(z).square()
    if act == 'sigmoid':
        s = torch.sigmoid(z)
        return s * (1 - s)
    if act == 'elu':
        return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(z))
    if act == 'selu':
        return torch.where(z > 0, torch.full_like(z, SELU_SCALE), SELU_SCALE * SELU_ALPHA * torch.exp(z))
    if act == 'softplus':
        return torch.where(z > SOFTPLUS_THRESHOLD, torch.ones_like(z), torch.sigmoid(z))
    if act == 'swish':
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    raise ValueError(f'bias_act: unknown activation {act!r}')


def _activate_grad2(z: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    """d^2 act / dz^2 in closed form, in differentiable PyTorch ops."""
    if act in ('linear', 'relu', 'lrelu'):
        return torch.zeros_like(z)
    if act == 'tanh':
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)
    if act == 'sigmoid':
        s = torch.sigmoid(z)
        return s * (1 - s) * (1 - 2 * s)
    if act == 'elu':
        return torch.where(z > 0, torch.zeros_like(z), alpha * torch.exp(z))
    if act == 'selu':
        return torch.where(z > 0, torch.zeros_like(z), SELU_SCALE * SELU_ALPHA * torch.exp(z))
    if act == 'softplus':
        s = torch.sigmoid(z)
        return torch.where(z > SOFTPLUS_THRESHOLD, torch.zeros_like(z), s * (1 - s))
    if act == 'swish':
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    raise ValueError(f'bias_act: unknown activation {act!r}')


def _add_bias(x: torch.Tensor, b: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    return x if b is None else x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])


def _clamp_mask(z: torch.Tensor, act: str, alpha: float, gain: float, clamp: float) -> Optional[torch.Tensor]:
    """Where the clamp lets the gradient through (None = everywhere)."""
    if clamp < 0:
        return None
    return ((activate(z, act, alpha) * gain).abs() <= clamp).to(z.dtype)


def _reduce_to_bias(dz: torch.Tensor, dim: int) -> torch.Tensor:
    return dz.sum([i for i in range(dz.ndim) if i != dim])


def _bias_act_impl(x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: str, alpha: float, gain: float, clamp: float) -> torch.Tensor:
    """clamp(act(x + b) * gain); b already in x's dtype; clamp < 0 = no clamp."""
    if x.device.type == 'cuda':
        ext = _build.get_extension('bias_act', SOURCES)
        return ext.bias_act(x, b, None, dim, ACTIVATIONS[act].index, alpha, gain, clamp)
    # PyTorch twin of the kernel (CPU), in the kernel's output layout.
    return torch.empty_like(x).copy_(_bias_act_ref(x, b, dim, act, alpha, gain, clamp))


def _bias_act_grad_impl(dy: torch.Tensor, x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: str, alpha: float, gain: float, clamp: float) -> torch.Tensor:
    """dy * act'(x + b) * gain, zero where the clamp is active: the gradient of x (and of b, summed)."""
    if x.device.type == 'cuda':
        ext = _build.get_extension('bias_act', SOURCES)
        return ext.bias_act(x, b, dy, dim, ACTIVATIONS[act].index, alpha, gain, clamp)
    z = _add_bias(x, b, dim)
    dz = dy * _activate_grad(z, act, alpha) * gain
    mask = _clamp_mask(z, act, alpha, gain, clamp)
    return torch.empty_like(x).copy_(dz if mask is None else dz * mask)


@torch.library.custom_op('next3d::bias_act', mutates_args=())
def _bias_act_op(x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: str, alpha: float, gain: float, clamp: float) -> torch.Tensor:
    """_bias_act_impl as a torch.library op (what torch.compile traces)."""
    return _bias_act_impl(x, b, dim, act, alpha, gain, clamp)


@torch.library.custom_op('next3d::bias_act_grad', mutates_args=())
def _bias_act_grad_op(dy: torch.Tensor, x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: str, alpha: float, gain: float, clamp: float) -> torch.Tensor:
    """_bias_act_grad_impl as a torch.library op."""
    return _bias_act_grad_impl(dy, x, b, dim, act, alpha, gain, clamp)


@_bias_act_op.register_fake
def _(x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x)


@_bias_act_grad_op.register_fake
def _(dy, x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x)


def _bias_act_setup(ctx, inputs, output):
    x, b, dim, act, alpha, gain, clamp = inputs
    ctx.save_for_backward(x, b)
    ctx.args = (dim, act, alpha, gain, clamp)


def _bias_act_backward(ctx, dy, grad_op=_bias_act_grad_op):
    x, b = ctx.saved_tensors
    dim = ctx.args[0]
    dz = grad_op(dy, x, b, *ctx.args)
    db = _reduce_to_bias(dz, dim) if ctx.needs_input_grad[1] else None
    return dz, db, None, None, None, None, None


def _bias_act_grad_setup(ctx, inputs, output):
    dy, x, b, dim, act, alpha, gain, clamp = inputs
    ctx.save_for_backward(dy, x, b)
    ctx.args = (dim, act, alpha, gain, clamp)


def _bias_act_grad_backward(ctx, g, grad_op=_bias_act_grad_op):
    # dz = dy * act'(z) * gain * mask(z): linear in dy (the same op again); in z it needs
    # act''(z), written in PyTorch so that higher derivatives exist too. mask is piecewise
    # constant, so it contributes nothing.
    dy, x, b = ctx.saved_tensors
    dim, act, alpha, gain, clamp = ctx.args
    d_dy = grad_op(g, x, b, *ctx.args) if ctx.needs_input_grad[0] else None
    d_z = d_b = None
    piecewise_linear = act in ('linear', 'relu', 'lrelu')     # act'' = 0: nothing flows to x and b
    if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and not piecewise_linear:
        z = _add_bias(x, b, dim)
        d_z = g * dy * _activate_grad2(z, act, alpha) * gain
        mask = _clamp_mask(z, act, alpha, gain, clamp)
        if mask is not None:
            d_z = d_z * mask
        d_b = _reduce_to_bias(d_z, dim) if ctx.needs_input_grad[2] else None
    return d_dy, d_z, d_b, None, None, None, None, None


_bias_act_op.register_autograd(_bias_act_backward, setup_context=_bias_act_setup)
_bias_act_grad_op.register_autograd(_bias_act_grad_backward, setup_context=_bias_act_grad_setup)


# Eager mode: the same bodies and formulas as plain autograd Functions (see _build.eager_function).
_BiasActGradFunction = _build.eager_function(
    '_BiasActGradFunction', _bias_act_grad_impl, _bias_act_grad_setup,
    lambda ctx, g: _bias_act_grad_backward(ctx, g, grad_op=_BiasActGradFunction.apply))
_BiasActFunction = _build.eager_function(
    '_BiasActFunction', _bias_act_impl, _bias_act_setup,
    lambda ctx, dy: _bias_act_backward(ctx, dy, grad_op=_BiasActGradFunction.apply))


def _bias_act_call(*inputs):
    """The kernel path: the torch.library op under torch.compile, the autograd Function in eager mode."""
    return (_bias_act_op if torch.compiler.is_compiling() else _BiasActFunction.apply)(*inputs)


def _self_check(ext, device: torch.device):
    """The kernel against the reference on a small input: forward and gradient, several activations, float32."""
    gen = torch.Generator().manual_seed(0)
    x, b, dy = (torch.randn(shape, generator=gen).to(device) for shape in ([2, 6, 5, 7], [6], [2, 6, 5, 7]))
    for act, clamp in (('linear', -1.0), ('lrelu', 0.8), ('tanh', -1.0), ('softplus', -1.0), ('swish', 1.0)):
        spec = ACTIVATIONS[act]
        args = (1, spec.index, spec.alpha, spec.gain, clamp)
        _build.assert_close('bias_act', f'{act} forward', ext.bias_act(x, b, None, *args),
                            _bias_act_ref(x, b, 1, act, spec.alpha, spec.gain, clamp), 1e-5)
        with torch.enable_grad():
            xr = x.clone().requires_grad_(True)
            ref = torch.autograd.grad(_bias_act_ref(xr, b, 1, act, spec.alpha, spec.gain, clamp), xr, dy)[0]
        _build.assert_close('bias_act', f'{act} gradient', ext.bias_act(x, b, dy, *args), ref, 1e-5)


_build.register_self_check('bias_act', _self_check)
