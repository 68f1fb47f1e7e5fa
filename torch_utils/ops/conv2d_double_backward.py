"""2-D convolutions whose gradient is itself differentiated through weight-gradient kernels (R1).

R1 differentiates D's input gradient once more. For a convolution y = conv(x, w), PyTorch's
own double backward computes the term for w (the weight gradient of "dx = conv^T(dy, w)")
as a forward convolution with the batch as channels and an image-sized kernel, on
transposed views: for a 3 x 3 layer at 128^2 and batch 4, a (32, 4, 128, 128) image with a
(32, 4, 128, 128) kernel, and for a depthwise FIR filter one such convolution per channel.
On a GPU cuDNN runs those with a slow implicit GEMM (small128's R1 phase at batch 32 took
2.3x the original's time on an H200); on the CPU they come with transposing copies.

Here every derivative is a convolution of the ordinary kind: with y = conv(x, w) bilinear,

    dx = conv^T(dy, w)               (the input gradient: the adjoint convolution)
    dw = wgrad(dy, x)                (convolution_backward's weight gradient)

and the derivatives of dw = wgrad(dy, x) given a gradient g for dw are conv(x, g) for dy
and conv^T(dy, g) for x; conv^T's are those of a convolution with the roles swapped.
Everything is built from `_Conv` and `_WeightGrad`, so it differentiates to any order.

Only the convolutions made inside `twice_differentiable()` take this path (the loss's R1
forward of D); elsewhere `conv2d` and `conv_transpose2d` are torch's own. R1's first
derivative runs inside `no_weight_gradients()`, as StyleGAN2's does.
"""

import contextlib
from typing import Tuple

import torch
import torch.nn.functional as F

from torch_utils import misc

_active = [0]               # nesting depth of twice_differentiable()
_no_weight_grads = [0]      # nesting depth of no_weight_gradients()


@contextlib.contextmanager
def twice_differentiable():
    """Convolutions made inside (through conv2d / conv_transpose2d below) have
    derivatives made of ordinary convolutions and weight gradients, to any order."""
    _active[0] += 1
    try:
        yield
    finally:
        _active[0] -= 1


@contextlib.contextmanager
def no_weight_gradients():
    """Backward passes run inside compute no weight gradients for those convolutions: for
    R1's first derivative, which asks for the input's gradient only (autograd cannot tell a
    custom function that a weight's gradient will be dropped)."""
    _no_weight_grads[0] += 1
    try:
        yield
    finally:
        _no_weight_grads[0] -= 1


def _wanted(x: torch.Tensor, w: torch.Tensor) -> bool:
    return _active[0] > 0 and misc.records_graph(x, w)


def conv2d(x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, groups: int = 1) -> torch.Tensor:
    """F.conv2d without bias (dilation 1); see the module docstring."""
    if not _wanted(x, w):
        return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    return _Conv.apply(x, w, (_pair(stride), _pair(padding), (0, 0), groups, False))


def conv_transpose2d(x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, output_padding=0, groups: int = 1) -> torch.Tensor:
    """F.conv_transpose2d without bias (dilation 1), w [in, out / groups, kh, kw]; see the module docstring."""
    if not _wanted(x, w):
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, output_padding=output_padding, groups=groups)
    return _Conv.apply(x, w, (_pair(stride), _pair(padding), _pair(output_padding), groups, True))


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _convolution(x, w, spec):
    stride, padding, output_padding, groups, transposed = spec
    return torch.ops.aten.convolution(x, w, None, list(stride), list(padding), [1, 1], transposed, list(output_padding), groups)


def _input_grad(dy: torch.Tensor, w: torch.Tensor, x_shape, spec) -> torch.Tensor:
    """Gradient for x of <dy, conv(x, w)>: the adjoint convolution of dy, differentiable."""
    stride, padding, _, groups, transposed = spec
    if transposed:          # the adjoint of a transposed convolution is the plain one
        return _Conv.apply(dy, w, (stride, padding, (0, 0), groups, False))
    kh, kw = w.shape[2:]
    output_padding = tuple(x_shape[2 + i] - ((dy.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + k)
                           for i, k in enumerate((kh, kw)))
    return _Conv.apply(dy, w, (stride, padding, output_padding, groups, True))


class _Conv(torch.autograd.Function):
    """y = conv(x, w) under `spec` (stride, padding, output_padding, groups, transposed)."""

    @staticmethod
    def forward(ctx, x, w, spec):
        ctx.spec = spec
        ctx.save_for_backward(x, w)
        return _convolution(x, w, spec)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        dx = _input_grad(dy, w, x.shape, ctx.spec) if need_x else None
        dw = _WeightGrad.apply(dy, x, w, ctx.spec) if need_w and not _no_weight_grads[0] else None
        return dx, dw, None


class _WeightGrad(torch.autograd.Function):
    """dw = gradient for w of <dy, conv(x, w)> (w: only its shape and layout are read)."""

    @staticmethod
    def forward(ctx, dy, x, w, spec):
        ctx.spec = spec
        ctx.save_for_backward(dy, x)
        stride, padding, output_padding, groups, transposed = spec
        return torch.ops.aten.convolution_backward(dy, x, w, None, list(stride), list(padding), [1, 1], transposed,
                                                   list(output_padding), groups, [False, True, False])[1]

    @staticmethod
    def backward(ctx, g):
        dy, x = ctx.saved_tensors
        need_dy, need_x, _, _ = ctx.needs_input_grad
        grad_dy = _Conv.apply(x, g, ctx.spec) if need_dy else None
        grad_x = _input_grad(dy, g, x.shape, ctx.spec) if need_x else None
        return grad_dy, grad_x, None, None
