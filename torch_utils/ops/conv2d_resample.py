"""2-D convolution fused with FIR upsampling or downsampling (StyleGAN2's resampling conv).

Definition (the "naive" composition that the fused paths must equal):

    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=P, gain=up**2)
    x = conv2d(x, w, groups=groups)                   (valid; no padding of its own)
    x = upfirdn2d(x, f, down=down)                    (only when down > 1)

where P is the user padding plus the padding that makes the resampling exact: for
up > 1 as in `upsample2d` ((fw + up - 1) // 2, (fw - up) // 2 per side), for down > 1 as
in `downsample2d` ((fw - down + 1) // 2, (fw - down) // 2). So with a k x k kernel and
padding = k // 2 the output is exactly up x (or 1/down x) the input.

The fused paths reorder the linear steps (convolution and FIR filtering commute) so the
convolution runs at the lower resolution: a strided transposed convolution for up, a
strided convolution for down.
"""

from typing import Optional

import torch

from . import conv2d_double_backward
from . import upfirdn2d as upfirdn2d_mod


def _conv(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding=(0, 0), groups: int = 1, transpose: bool = False, flip_weight: bool = True) -> torch.Tensor:
    """conv2d (flip_weight=True: correlation, as torch does; False: true convolution) or
    its transpose with the same weight [out, in / groups, kh, kw]."""
    if not flip_weight:
        w = w.flip([2, 3])
    if x.device.type == 'cpu':
        # oneDNN's CPU kernels work channels last; given NCHW they reorder the input and
        # output around every call. Channels-last operands keep its output channels last
        # too, so the next layer's input is already in that layout (elementwise ops keep
        # it). small128 Next3D, batch 4, one thread: inference 0.95x the time, a training
        # step 0.98x (backward convolutions gain less than forward ones).
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        if w.shape[2:] == (1, 1) and not transpose and stride == 1 and groups == 1 and tuple(padding) == (0, 0):
            return _conv1x1_cpu(x, w)
    if not transpose:
        return conv2d_double_backward.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    # conv_transpose2d wants [in, out / groups, kh, kw].
    out_channels, in_per_group, kh, kw = w.shape
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    return conv2d_double_backward.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)


def _conv1x1_cpu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of channels-last x [N, I, H, W] with w [O, I, 1, 1] as one matrix
    product of the pixels [N H W, I] with w^T, returned as a channels-last [N, O, H, W] view.
    torch sends 1x1 convolutions to its generic kernel, which makes NCHW copies of a
    channels-last input and gradient in the backward; the product's gradients are two more
    products on the same views (32 -> 32 channels at 128^2, batch 4, one thread: forward and
    backward 4.4 against 7.0 ms; 96 -> 32: 14 against 21 ms). Differentiable to any order."""
    batch, channels, height, width = x.shape
    y = x.permute(0, 2, 3, 1).reshape(-1, channels) @ w.reshape(len(w), channels).t()
    return y.view(batch, height, width, len(w)).permute(0, 3, 1, 2)


def conv2d_resample(
    x: torch.Tensor,                    # Input [N, C_in, H, W].
    w: torch.Tensor,                    # Weight [C_out, C_in / groups, kh, kw], same dtype as x.
    f: Optional[torch.Tensor] = None,   # Float32 FIR filter from setup_filter; None = identity (box of 1 tap).
    up: int = 1,                        # Integer upsampling factor.
    down: int = 1,                      # Integer downsampling factor.
    padding=0,                          # Padding of the input: int, (x, y) or (x0, x1, y0, y1).
    groups: int = 1,                    # Grouped convolution.
    flip_weight: bool = True,           # True = correlation (like torch conv2d); False = true convolution.
    flip_filter: bool = False,          # Orientation of the FIR filter, as in upfirdn2d.
) -> torch.Tensor:
    """Resampling convolution; see the module docstring. Returns [N, C_out, H', W'] in x's dtype."""
    if not (isinstance(x, torch.Tensor) and x.ndim == 4 and isinstance(w, torch.Tensor) and w.ndim == 4):
        raise ValueError('conv2d_resample: x must be [N, C, H, W] and w [C_out, C_in / groups, kh, kw]')
    if w.dtype != x.dtype:
        raise ValueError(f'conv2d_resample: w has dtype {w.dtype} but x has {x.dtype}')
    if not (isinstance(up, int) and up >= 1 and isinstance(down, int) and down >= 1):
        raise ValueError(f'conv2d_resample: up and down must be integers >= 1, got up={up!r}, down={down!r}')
    if not (isinstance(groups, int) and groups >= 1 and x.shape[1] == w.shape[1] * groups and w.shape[0] % groups == 0):
        raise ValueError(f'conv2d_resample: x {tuple(x.shape)} and w {tuple(w.shape)} do not fit groups={groups}')
    out_channels, in_per_group, kh, kw = w.shape
    fw, fh = upfirdn2d_mod.get_filter_size(f)
    px0, px1, py0, py1 = upfirdn2d_mod.parse_padding(padding)

    # Padding that makes the resampling exact.
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2

    # 1x1 kernel: the convolution commutes with everything, run it at the low resolution.
    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = upfirdn2d_mod.upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d_mod.upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up ** 2, flip_filter=flip_filter)

    # Downsampling: filter at full resolution, then a strided convolution.
    if down > 1 and up == 1:
        x = upfirdn2d_mod.upfirdn2d(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)

    # Upsampling: a strided transposed convolution computes the full convolution of the
    # zero-inserted input with the (flipped) kernel; shifting by kernel size - 1 (left)
    # and kernel size - up (right) turns that into the valid convolution of the padded
    # input, and the FIR filter runs last.
    if up > 1:
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        # Let the transposed convolution do the symmetric part of any cropping.
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv(x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=not flip_weight)
        x = upfirdn2d_mod.upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up ** 2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d_mod.upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x

    # No resampling: a plain convolution where its padding can express ours.
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)
    x = upfirdn2d_mod.upfirdn2d(x, None, padding=[px0, px1, py0, py1])
    return _conv(x, w, groups=groups, flip_weight=flip_weight)
