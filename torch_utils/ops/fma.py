"""Fused multiply-add a * b + c with broadcasting.

There is no CUDA kernel of our own here on purpose: `torch.addcmul` already runs as one
fused elementwise kernel on every device, broadcasts its three inputs, and its autograd
formula sums each gradient back to that input's shape (so a [C, 1, 1] scale gets a
[C, 1, 1] gradient). It is differentiable to any order, and `torch.compile` fuses it
with its neighbours. (StyleGAN2 needed a custom autograd function for this because of
how older PyTorch versions handled these gradients; PyTorch 2.x does not.)
"""

import torch


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c; the three tensors broadcast against each other; result in their promoted dtype."""
    return torch.addcmul(c, a, b)
