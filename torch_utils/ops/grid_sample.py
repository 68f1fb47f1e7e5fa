"""Bilinear grid_sample whose gradient to the images is itself differentiable.

    grid_sample(images (B, C, H, W), grid (B, H_out, W_out, 2), padding_mode) -> (B, C, H_out, W_out)
        = torch.nn.functional.grid_sample(images, grid, 'bilinear', padding_mode, align_corners=False)

R1 on augmented reals differentiates D's gradient to the images, and with the augmentation
pipe's resampling in between that gradient passes through grid_sample's backward. PyTorch
2.4 and 2.11 have no derivative for `grid_sampler_2d_backward` (2.13 has; "derivative for
aten::grid_sampler_2d_backward is not implemented": `train.py --aug ada` stopped at its
first R1 step there). For a fixed grid the sampling is a linear map A of the images, so its
backward is the linear map A^T of the output gradient, whose derivative is A again: the
backward of the backward is this grid_sample. The grid gets no gradient (it must not need
one); the maths and kernels are PyTorch's own, so values and first gradients are those of
F.grid_sample.
"""

import torch

_PADDING_MODES = {'zeros': 0, 'border': 1, 'reflection': 2}     # PyTorch's GridSamplerPadding enum
_BILINEAR = 0                                                  # PyTorch's GridSamplerInterpolation enum


def grid_sample(images: torch.Tensor, grid: torch.Tensor, padding_mode: str = 'zeros') -> torch.Tensor:
    """Args:
        images:       (B, C, H, W) float.
        grid:         (B, H_out, W_out, 2) grid_sample coordinates (x then y; -1 and 1 at the outer
                      edges of the border pixels), not requiring grad.
        padding_mode: 'zeros', 'border' or 'reflection'.
    Returns:
        (B, C, H_out, W_out), differentiable in `images` to any order.
    """
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f'grid_sample: padding_mode must be one of {sorted(_PADDING_MODES)}, got {padding_mode!r}')
    if grid.requires_grad:
        raise ValueError('grid_sample: the grid must not require grad (gradients reach the images only)')
    return _GridSample.apply(images, grid, padding_mode)


class _GridSample(torch.autograd.Function):
    """images -> A images (A: the bilinear sampling at `grid`)."""

    @staticmethod
    def forward(ctx, images, grid, padding_mode):
        ctx.save_for_backward(images, grid)
        ctx.padding_mode = padding_mode
        return torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode=padding_mode, align_corners=False)

    @staticmethod
    def backward(ctx, grad_output):
        images, grid = ctx.saved_tensors
        grad_images = _GridSampleTranspose.apply(grad_output, images, grid, ctx.padding_mode) if ctx.needs_input_grad[0] else None
        return grad_images, None, None


class _GridSampleTranspose(torch.autograd.Function):
    """grad_output -> A^T grad_output (`images` only gives the result its shape)."""

    @staticmethod
    def forward(ctx, grad_output, images, grid, padding_mode):
        ctx.save_for_backward(grid)
        ctx.padding_mode = padding_mode
        grad_images, _ = torch.ops.aten.grid_sampler_2d_backward(grad_output, images, grid, _BILINEAR, _PADDING_MODES[padding_mode],
                                                                 False, [True, False])
        return grad_images

    @staticmethod
    def backward(ctx, grad_grad_images):
        grid, = ctx.saved_tensors
        grad = _GridSample.apply(grad_grad_images, grid, ctx.padding_mode) if ctx.needs_input_grad[0] else None
        return grad, None, None, None
