"""Upsample, FIR-filter, downsample (`upfirdn2d`) on NCHW images, and its helpers.

The operation, per image and channel, in this order:
1. zero-insert upsample by `up`: x[i] -> xu[i * up], the other up - 1 samples are zero
   (the output has H * up rows, the last up - 1 of them zero);
2. pad by (x0, x1, y0, y1) zeros; negative values crop instead;
3. FIR filter with `f` ("valid" mode, so the filter never reads outside the padded
   image). With `flip_filter=False` this is a true convolution (the kernel is flipped
   before a correlation), with `flip_filter=True` a correlation. The filter is scaled
   so that its overall gain is `gain`;
4. keep every `down`-th sample, starting at the first.
Output size per axis: (in * up + pad0 + pad1 - taps) // down + 1.

Filters are float32 tensors made by `setup_filter`: 2-D [taps_y, taps_x], or 1-D [taps]
meaning the separable outer product f[y] * f[x]. `f=None` means the identity [[1]].

Two implementations: `_upfirdn2d_ref` (plain PyTorch, defines the maths) and the direct
CUDA kernel in upfirdn2d.cu, registered as the torch.library op `next3d::upfirdn2d` (2-D
filters; a 1-D filter runs as two passes). The op is linear in x and its gradient is
another upfirdn2d (down and up swapped, the filter flipped, the padding mirrored), so
derivatives of any order run on the kernel. Filter gradients exist only in the
reference, which is used whenever f requires grad.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from torch_utils import misc

from . import _build
from . import conv2d_double_backward

SOURCES = ('upfirdn2d.cpp', 'upfirdn2d.cu')

Scaling = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int]]


def parse_scaling(scaling: Scaling) -> tuple:
    """An int or an (x, y) pair -> (sx, sy), both integers >= 1."""
    if isinstance(scaling, int):
        scaling = (scaling, scaling)
    sx, sy = (int(s) for s in scaling)
    if sx < 1 or sy < 1:
        raise ValueError(f'upfirdn2d: scaling factors must be integers >= 1, got {tuple(scaling)}')
    return sx, sy


def parse_padding(padding: Padding) -> tuple:
    """An int, an (x, y) pair or (x0, x1, y0, y1) -> (x0, x1, y0, y1); negative values crop."""
    if isinstance(padding, int):
        padding = (padding, padding)
    padding = tuple(int(p) for p in padding)
    if len(padding) == 2:
        px, py = padding
        padding = (px, px, py, py)
    if len(padding) != 4:
        raise ValueError(f'upfirdn2d: padding must be an int, (x, y) or (x0, x1, y0, y1), got {padding}')
    return padding


def get_filter_size(f: Optional[torch.Tensor]) -> tuple:
    """Number of taps (fw, fh) of a filter made by `setup_filter` (None = 1x1)."""
    if f is None:
        return 1, 1
    if f.ndim not in (1, 2):
        raise ValueError(f'upfirdn2d: filter must be 1-D or 2-D, got shape {tuple(f.shape)}')
    fw = f.shape[-1]
    fh = f.shape[0]
    return int(fw), int(fh)


def setup_filter(
    f,                              # Filter taps: None (= [1]), a number, a 1-D or 2-D array-like.
    device=torch.device('cpu'),     # Device of the returned tensor.
    normalize: bool = True,         # Scale the taps to sum to 1 (so a constant passes unchanged).
    flip_filter: bool = False,      # Flip the taps (only matters for asymmetric filters).
    gain: float = 1,                # Overall gain of the filter (applied across both axes).
    separable: Optional[bool] = None,   # Keep a 1-D filter 1-D (separable); None = only when it has >= 8 taps.
) -> torch.Tensor:
    """Turn filter taps into the float32 tensor that `upfirdn2d` expects.

    A 1-D filter is either kept 1-D (applied along x, then y: the separable outer
    product) or expanded to its 2-D outer product; both give the same result, the 1-D
    form is cheaper for long filters. Returns a float32 tensor [taps] or [taps_y, taps_x].
    """
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim not in (1, 2) or f.numel() == 0:
        raise ValueError(f'setup_filter: expected a non-empty 1-D or 2-D filter, got shape {tuple(f.shape)}')
    if separable is None:
        separable = (f.ndim == 1 and f.numel() >= 8)
    if f.ndim == 1 and not separable:
        f = f.ger(f)
    if f.ndim != (1 if separable else 2):
        raise ValueError(f'setup_filter: separable={separable} does not fit a {f.ndim}-D filter')
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 1 and gain < 0:
        raise ValueError(f'setup_filter: a separable filter runs once per axis, so a negative gain ({gain}) cannot be '
                         'baked into it: pass the gain to upfirdn2d instead')
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)


def _check_args(x: torch.Tensor, f: Optional[torch.Tensor]):
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f'upfirdn2d: x must be a floating-point NCHW tensor, got {type(x).__name__} {tuple(getattr(x, "shape", ()))} {getattr(x, "dtype", "")}')
    if f is not None:
        if not isinstance(f, torch.Tensor) or f.dtype != torch.float32:
            raise ValueError('upfirdn2d: f must be a float32 tensor made by setup_filter (or None)')
        get_filter_size(f)


def output_size(in_size: tuple, f: Optional[torch.Tensor], up: Scaling, down: Scaling, padding: Padding) -> tuple:
    """(H, W) of upfirdn2d's output for an input of size (H, W); raises if it would be empty."""
    upx, upy = parse_scaling(up)
    downx, downy = parse_scaling(down)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = get_filter_size(f)
    in_h, in_w = in_size
    out_h = (in_h * upy + pady0 + pady1 - fh) // downy + 1
    out_w = (in_w * upx + padx0 + padx1 - fw) // downx + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f'upfirdn2d: input {in_h}x{in_w} with up={up}, padding={padding} and a {fh}x{fw} filter leaves an empty output')
    return out_h, out_w


def _upfirdn2d_ref(x: torch.Tensor, f: Optional[torch.Tensor], up: Scaling, down: Scaling, padding: Padding, flip_filter: bool, gain: float) -> torch.Tensor:
    """Reference: plain PyTorch, exact, differentiable to any order (in x and f).

    Written to touch memory as little as a composition of PyTorch ops can (on the CPU
    this is what runs): upsampling alone is a transposed convolution where the padding
    fits one (`_upsample_transposed`), else the zero-inserted image is written once with
    its padding; symmetric padding without upsampling is left to the convolution, and the
    decimation is the convolution's stride (no full-resolution output is computed and
    thrown away).
    """
    upx, upy = parse_scaling(up)
    downx, downy = parse_scaling(down)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    batch, channels, in_h, in_w = x.shape
    if downx == downy == 1 and max(upx, upy) > 1:
        y = _upsample_transposed(x, f, (upx, upy), (padx0, padx1, pady0, pady1), flip_filter, gain)
        if y is not None:
            return y

    # Crop where the padding is negative, pad with zeros where it is positive. Samples
    # k * up of the zero-inserted image hold x; cropping them whole first keeps that.
    crop = [max(-p, 0) for p in (padx0, padx1, pady0, pady1)]
    pad = [max(p, 0) for p in (padx0, padx1, pady0, pady1)]
    conv_pad = (0, 0)
    if upx == upy == 1 and pad[0] == pad[1] and pad[2] == pad[3]:
        conv_pad = (pad[2], pad[0])                           # the convolution pads (no copy)
        x = x[:, :, crop[2]: in_h - crop[3], crop[0]: in_w - crop[1]]
    else:
        # Zero-insert upsample (x[i] -> xu[i * up]) and pad in one write of the result.
        full_h, full_w = in_h * upy + pad[2] + pad[3], in_w * upx + pad[0] + pad[1]
        xu = x.new_zeros([batch, channels, full_h, full_w])
        xu[:, :, pad[2]: pad[2] + in_h * upy: upy, pad[0]: pad[0] + in_w * upx: upx] = x
        x = xu[:, :, crop[2]: full_h - crop[3], crop[0]: full_w - crop[1]]

    # FIR filter as a depthwise correlation (a true convolution flips the kernel first);
    # decimation = the convolution's stride.
    f, fy = _scaled_filter(f, x, gain, flip=not flip_filter)
    if fy is None:
        return conv2d_double_backward.conv2d(x, f[None, None].expand(channels, 1, *f.shape), stride=(downy, downx), padding=conv_pad, groups=channels)
    x = conv2d_double_backward.conv2d(x, f[None, None, None, :].expand(channels, 1, 1, f.shape[0]), stride=(1, downx), padding=(0, conv_pad[1]), groups=channels)
    return conv2d_double_backward.conv2d(x, fy[None, None, :, None].expand(channels, 1, fy.shape[0], 1), stride=(downy, 1), padding=(conv_pad[0], 0), groups=channels)


def axis_gains(gain: float) -> Tuple[float, float]:
    """A 1-D filter's gains for its x and y passes: their product is `gain`, its sign in the x
    pass (sqrt of a negative gain would be complex)."""
    return math.copysign(abs(gain) ** 0.5, gain), abs(gain) ** 0.5


def _scaled_filter(f: torch.Tensor, x: torch.Tensor, gain: float, flip: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """f in x's dtype and device, flipped if asked, with overall gain `gain`: (2-D filter, None),
    or a 1-D filter's (x pass, y pass) filters."""
    f = f.to(device=x.device, dtype=x.dtype)
    f = f.flip(list(range(f.ndim))) if flip else f
    if f.ndim == 2:
        return f * gain, None
    gain_x, gain_y = axis_gains(gain)
    return f * gain_x, f * gain_y


def _upsample_transposed(x: torch.Tensor, f: torch.Tensor, up: tuple, padding: tuple, flip_filter: bool, gain: float) -> Optional[torch.Tensor]:
    """Upsampling without decimation as one depthwise transposed convolution (per axis for a
    1-D filter), or None where the padding does not fit one.

    A transposed convolution with stride `up` is the zero-inserted image filtered without
    writing the zeros or multiplying by them (the CPU's common upsample2d 2x with a 4-tap
    filter: 2-3x faster than the zero-inserted image's convolution). Per axis, with taps k,
    input size n and padding p0, p1: the full transposed output [(n - 1) * up + k] holds
    the result from sample k - 1 - p0 on, and ends k - up - p1 samples before its end; the
    convolution's `padding` crops the first, `output_padding` (< up) gives the difference.
    """
    (upx, upy), (padx0, padx1, pady0, pady1) = up, padding
    fw, fh = get_filter_size(f)
    crops = []
    for k, u, p0, p1 in ((fh, upy, pady0, pady1), (fw, upx, padx0, padx1)):
        start, end = k - 1 - p0, k - u - p1
        if start < 0 or end < 0 or not 0 <= start - end < u:
            return None
        crops.append((start, start - end))
    (cy, oy), (cx, ox) = crops
    channels = x.shape[1]
    # A transposed convolution scatters with its kernel as given: the true convolution's
    # kernel is f itself (a correlation's, f flipped).
    f, fy = _scaled_filter(f, x, gain, flip=flip_filter)
    if fy is None:
        w = f[None, None].expand(channels, 1, fh, fw)
        return conv2d_double_backward.conv_transpose2d(x, w, stride=(upy, upx), padding=(cy, cx), output_padding=(oy, ox), groups=channels)
    x = conv2d_double_backward.conv_transpose2d(x, f[None, None, None, :].expand(channels, 1, 1, fw), stride=(1, upx), padding=(0, cx), output_padding=(0, ox), groups=channels)
    return conv2d_double_backward.conv_transpose2d(x, fy[None, None, :, None].expand(channels, 1, fh, 1), stride=(upy, 1), padding=(cy, 0), output_padding=(oy, 0), groups=channels)


def upfirdn2d(
    x: torch.Tensor,                # Input images [N, C, H, W], any float dtype.
    f: Optional[torch.Tensor],      # Float32 filter from setup_filter, [fh, fw] or [taps]; None = identity.
    up: Scaling = 1,                # Zero-insert upsampling factor: int or (x, y).
    down: Scaling = 1,              # Decimation factor: int or (x, y).
    padding: Padding = 0,           # Padding after upsampling: int, (x, y) or (x0, x1, y0, y1); negative crops.
    flip_filter: bool = False,      # False = true convolution, True = correlation.
    gain: float = 1,                # Overall gain of the filter.
    impl: Optional[str] = None,     # None = CUDA kernel where possible, 'ref' = reference, 'cuda' = require CUDA tensors.
) -> torch.Tensor:
    """Upsample, pad, FIR-filter and downsample a batch of images (see the module docstring).

    Returns [N, C, (H * upy + pady0 + pady1 - fh) // downy + 1, (W * upx + padx0 + padx1 - fw) // downx + 1]
    in x's dtype. Gradients flow to x (and to f with the reference).
    """
    _check_args(x, f)
    output_size(x.shape[2:], f, up, down, padding)
    if f is not None and f.device != x.device:
        f = f.to(x.device)      # a filter left on the CPU must not silently disable the kernel
    if (f is None or not f.requires_grad) and _build.want_kernel('upfirdn2d', impl, x, f) and _build.kernel_available('upfirdn2d', SOURCES, x.device):
        return _upfirdn2d_kernel(x, f, up, down, padding, flip_filter, gain)
    return _upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain)


def filter2d(x: torch.Tensor, f: Optional[torch.Tensor], padding: Padding = 0, flip_filter: bool = False, gain: float = 1, impl: Optional[str] = None) -> torch.Tensor:
    """FIR-filter x [N, C, H, W] keeping its size ('same' padding), plus optional extra `padding`."""
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = get_filter_size(f)
    p = [padx0 + fw // 2, padx1 + (fw - 1) // 2, pady0 + fh // 2, pady1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x: torch.Tensor, f: Optional[torch.Tensor], up: Scaling = 2, padding: Padding = 0, flip_filter: bool = False, gain: float = 1, impl: Optional[str] = None) -> torch.Tensor:
    """Upsample x [N, C, H, W] to exactly [N, C, H * upy, W * upx] with the FIR filter f.

    The filter gain is multiplied by upx * upy to make up for the inserted zeros, so a
    constant image stays constant (away from the borders) when f is normalized.
    """
    upx, upy = parse_scaling(up)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = get_filter_size(f)
    p = [padx0 + (fw + upx - 1) // 2, padx1 + (fw - upx) // 2, pady0 + (fh + upy - 1) // 2, pady1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=(upx, upy), padding=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x: torch.Tensor, f: Optional[torch.Tensor], down: Scaling = 2, padding: Padding = 0, flip_filter: bool = False, gain: float = 1, impl: Optional[str] = None) -> torch.Tensor:
    """Filter and downsample x [N, C, H, W] to [N, C, H // downy, W // downx] (exact when divisible)."""
    downx, downy = parse_scaling(down)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = get_filter_size(f)
    p = [padx0 + (fw - downx + 1) // 2, padx1 + (fw - downx) // 2, pady0 + (fh - downy + 1) // 2, pady1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=(downx, downy), padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


# ---------------------------------------------------------------------------------------
# The torch.library op (2-D filters only).

def _output_format(x: torch.Tensor) -> torch.memory_format:
    """The kernel's output layout: channels_last when x is (and is not also contiguous)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _identity_filter(device: torch.device) -> torch.Tensor:
    """The float32 [[1]] filter that f=None means, on `device`, made once."""
    return misc.device_constant('upfirdn2d.identity_filter', device, lambda d: torch.ones([1, 1], dtype=torch.float32, device=d))


def _upfirdn2d_kernel(x, f, up, down, padding, flip_filter, gain) -> torch.Tensor:
    """upfirdn2d through the op; a 1-D filter runs as an x pass and a y pass.

    The filter goes to the op as given, with no per-call preparation (the kernel reads it
    flipped and applies the gain)."""
    upx, upy = parse_scaling(up)
    downx, downy = parse_scaling(down)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    if f is None:
        f = _identity_filter(x.device)
    if f.ndim == 2:
        return _upfirdn2d_call(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, float(gain))
    gain_x, gain_y = axis_gains(gain)
    x = _upfirdn2d_call(x, f[None, :], upx, 1, downx, 1, padx0, padx1, 0, 0, flip_filter, gain_x)
    return _upfirdn2d_call(x, f[:, None], 1, upy, 1, downy, 0, 0, pady0, pady1, flip_filter, gain_y)


def _upfirdn2d_impl(x: torch.Tensor, f: torch.Tensor, upx: int, upy: int, downx: int, downy: int,
                    padx0: int, padx1: int, pady0: int, pady1: int, flip_filter: bool, gain: float) -> torch.Tensor:
    """upfirdn2d with a 2-D float32 filter on x's device; gain scales the filter."""
    if x.device.type == 'cuda':
        ext = _build.get_extension('upfirdn2d', SOURCES)
        return ext.upfirdn2d(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain)
    # PyTorch twin of the kernel (CPU), in the kernel's output layout.
    y = _upfirdn2d_ref(x, f, (upx, upy), (downx, downy), (padx0, padx1, pady0, pady1), flip_filter, gain)
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_output_format(x)).copy_(y)


@torch.library.custom_op('next3d::upfirdn2d', mutates_args=())
def _upfirdn2d_op(x: torch.Tensor, f: torch.Tensor, upx: int, upy: int, downx: int, downy: int,
                  padx0: int, padx1: int, pady0: int, pady1: int, flip_filter: bool, gain: float) -> torch.Tensor:
    """_upfirdn2d_impl as a torch.library op (what torch.compile traces)."""
    return _upfirdn2d_impl(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain)


@_upfirdn2d_op.register_fake
def _(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
    out_h = (x.shape[2] * upy + pady0 + pady1 - f.shape[0]) // downy + 1
    out_w = (x.shape[3] * upx + padx0 + padx1 - f.shape[1]) // downx + 1
    return torch.empty([x.shape[0], x.shape[1], out_h, out_w], dtype=x.dtype, device=x.device, memory_format=_output_format(x))


def _upfirdn2d_setup(ctx, inputs, output):
    x, f, *args = inputs
    ctx.save_for_backward(f)
    ctx.in_size = (x.shape[2], x.shape[3])
    ctx.args = args


def _adjoint_args(args: tuple, in_size: tuple, out_size: tuple, f_shape) -> tuple:
    """The op arguments (after x, f) of the adjoint upfirdn2d, whose output has the input's size.

    The adjoint of zero-insert/pad/filter/decimate: zero-insert by down, filter with the
    flipped filter, decimate by up; the padding is mirrored.
    """
    upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain = args
    (in_h, in_w), (out_h, out_w), (taps_h, taps_w) = in_size, out_size, f_shape
    gpadx0 = taps_w - padx0 - 1
    gpadx1 = in_w * upx - out_w * downx + padx0 - upx + 1
    gpady0 = taps_h - pady0 - 1
    gpady1 = in_h * upy - out_h * downy + pady0 - upy + 1
    return downx, downy, upx, upy, gpadx0, gpadx1, gpady0, gpady1, not flip_filter, gain


def _upfirdn2d_backward(ctx, dy, op=_upfirdn2d_op):
    f, = ctx.saved_tensors
    dx = op(dy, f, *_adjoint_args(ctx.args, ctx.in_size, dy.shape[2:], f.shape))
    return dx, None, None, None, None, None, None, None, None, None, None, None


_upfirdn2d_op.register_autograd(_upfirdn2d_backward, setup_context=_upfirdn2d_setup)


# Eager mode: the same body and formula as a plain autograd Function (see _build.eager_function).
_Upfirdn2dFunction = _build.eager_function(
    '_Upfirdn2dFunction', _upfirdn2d_impl, _upfirdn2d_setup,
    lambda ctx, dy: _upfirdn2d_backward(ctx, dy, op=_Upfirdn2dFunction.apply))


def _upfirdn2d_call(*inputs):
    """The kernel path: the torch.library op under torch.compile, the autograd Function in eager mode."""
    return (_upfirdn2d_op if torch.compiler.is_compiling() else _Upfirdn2dFunction.apply)(*inputs)


def _self_check(ext, device: torch.device):
    """The kernel against the reference on a small input: up/down/padding/flip cases and the gradient (the adjoint call)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn([2, 3, 9, 11], generator=gen).to(device)
    f = torch.randn([4, 3], generator=gen).to(device)
    for up, down, pad, flip in (((1, 1), (1, 1), (1, 2, 2, 1), False), ((2, 2), (1, 1), (2, 1, 1, 2), True),
                                ((1, 1), (2, 2), (0, 1, 1, 0), False), ((2, 1), (1, 2), (-1, 2, 1, -1), False)):
        got = ext.upfirdn2d(x, f, up[0], up[1], down[0], down[1], *pad, flip, 1.5)
        _build.assert_close('upfirdn2d', f'forward up={up} down={down} pad={pad}', got, _upfirdn2d_ref(x, f, up, down, pad, flip, 1.5), 1e-5)
    args = (2, 2, 1, 1, 2, 1, 1, 2, False, 1.5)
    with torch.enable_grad():
        xr = x.clone().requires_grad_(True)
        y = _upfirdn2d_ref(xr, f, args[0:2], args[2:4], args[4:8], args[8], args[9])
        dy = torch.randn(y.shape, generator=gen).to(device)
        ref = torch.autograd.grad(y, xr, dy)[0]
    got = ext.upfirdn2d(dy, f, *_adjoint_args(args, x.shape[2:], dy.shape[2:], f.shape))
    _build.assert_close('upfirdn2d', 'gradient', got, ref, 1e-5)


_build.register_self_check('upfirdn2d', _self_check)
