"""Crop the mouth region out of the front render and paste a patch back into it.

Pixel convention: image coordinates are continuous, in pixels, with the origin at the
top-left corner of the image; pixel i (column or row) covers [i, i + 1) and has its centre
at i + 0.5. This is grid_sample's align_corners=False convention, and the mouth box of
spec section 4 (landmark NDC * 128 + 128 on a 256 render) is expressed in it.

A box is (cx, cy, side): the square [cx - side/2, cx + side/2) x [cy - side/2, cy + side/2),
floats, one per sample. Both directions resample the same way: the input is reconstructed
by bilinear interpolation between pixel centres (grid_sample's reconstruction with
align_corners=False), and each output pixel takes the mean of that reconstruction over
its own footprint. A reduction is thus box-filtered (antialiased) over the bilinear
reconstruction; an enlargement approaches plain bilinear interpolation; linear ramps are
reproduced exactly; the result varies continuously with the box size. It is computed as
a per-sample separable matrix (closed-form integrals of the interpolation tents), with
batched tensor algebra only: no host sync, no loop over samples.
"""

import torch

from torch_utils import misc


def _tent_integral(u: torch.Tensor) -> torch.Tensor:
    """Antiderivative of the unit tent max(0, 1 - |u|), from -inf: 0 below -1, 1 above 1."""
    u = u.clamp(-1, 1)
    return torch.where(u < 0, (u + 1) ** 2 / 2, 1 - (1 - u) ** 2 / 2)


def _resampling_matrix(start: torch.Tensor, step: torch.Tensor, num_out: int, num_in: int, border: bool) -> torch.Tensor:
    """Weights (B, num_out, num_in) of a 1D resampling.

    Output pixel j stands for the input interval [start + j * step, start + (j + 1) * step)
    (input pixel units, start and step (B,)). Its weights are the means over that interval
    of the input pixels' interpolation tents (centred on i + 0.5, half-width 1).
    border=False: outside the input reads zero (grid_sample's padding_mode='zeros').
    border=True: the first and last pixels extend to infinity (padding_mode='border'), and
    every row sums to exactly 1.
    """
    start, step = start.reshape(-1, 1, 1), step.reshape(-1, 1, 1)
    j = torch.arange(num_out, device=start.device, dtype=start.dtype).reshape(1, -1, 1)
    centres_in = torch.arange(num_in, device=start.device, dtype=start.dtype).reshape(1, 1, -1) + 0.5
    low = start + j * step - centres_in                           # interval ends relative to each tent
    high = low + step
    mid = low + step / 2
    integral_low, integral_high = _tent_integral(low), _tent_integral(high)
    value_mid = (1 - mid.abs()).clamp(min=0)
    if border:   # the edge pixels' tents stay at 1 outward: their antiderivative grows like u
        first = torch.zeros(1, 1, num_in, dtype=torch.bool, device=start.device)
        last = first.clone()
        first[..., 0], last[..., -1] = True, True
        integral_low = torch.where(first & (low < 0), low + 0.5, torch.where(last & (low > 0), low + 0.5, integral_low))
        integral_high = torch.where(first & (high < 0), high + 0.5, torch.where(last & (high > 0), high + 0.5, integral_high))
        value_mid = torch.where((first & (mid < 0)) | (last & (mid > 0)), torch.ones_like(value_mid), value_mid)
    # A vanishing footprint is a point sample; avoid the cancellation in the integral's difference.
    tiny = step < 1e-4
    mean = (integral_high - integral_low) / torch.where(tiny, torch.ones_like(step), step)
    return torch.where(tiny, value_mid, mean)


LIP_LANDMARKS = slice(48, 60)          # outer lip, iBUG 68-point order
MOUTH_CORNERS = (48, 54)
MOUTH_BOX_SCALE = 1.2                  # box side = floor(1.2 x the lips' larger extent)


def mouth_box_from_landmarks(landmarks_ndc: torch.Tensor, image_size: int = 256) -> torch.Tensor:
    """Mouth box of each sample from its landmarks in the front view.

    Args:
        landmarks_ndc: (B, 68, 2+) iBUG landmarks projected by the front orthographic view,
                       NDC x (columns) and y (rows) in [-1, 1]; extra columns (depth) ignored.
        image_size:    side of the front render in pixels.
    Returns:
        (B, 3) float (cx, cy, side) in pixels: centre = midpoint of the mouth corners 48 and
        54, side = floor(1.2 x max(width, height) of the outer lip 48-59), as Next3D.
    """
    misc.assert_shape(landmarks_ndc, [None, 68, None], 'landmarks_ndc')
    pixels = (landmarks_ndc[..., :2] + 1) * (image_size / 2)          # NDC -1 is the image's left/top edge
    centre = (pixels[:, MOUTH_CORNERS[0]] + pixels[:, MOUTH_CORNERS[1]]) / 2
    lips = pixels[:, LIP_LANDMARKS]
    extent = (lips.amax(dim=1) - lips.amin(dim=1)).amax(dim=1)
    side = torch.floor(MOUTH_BOX_SCALE * extent).clamp(min=1)
    return torch.cat([centre, side.unsqueeze(1)], dim=1)


def _geometry_dtype(front: torch.Tensor) -> torch.dtype:
    """Boxes and weights in at least float32: half precision cannot hold pixel positions of a 256 render."""
    return torch.promote_types(front.dtype, torch.float32)


def _check_box(box: torch.Tensor, batch_size: int):
    misc.assert_shape(box, [batch_size, 3], 'box')
    if not box.is_floating_point():
        raise TypeError(f'box: expected a floating-point (cx, cy, side) tensor, got {box.dtype}')


def crop_mouth(front: torch.Tensor, box: torch.Tensor, out_size: int = 64) -> torch.Tensor:
    """Resample each sample's square box to out_size x out_size, antialiased.

    Args:
        front: (B, C, H, W) image or feature render.
        box:   (B, 3) float (cx, cy, side) in pixels (see the module docstring).
    Returns:
        (B, C, out_size, out_size); parts of a box outside the image read zeros (as
        grid_sample's padding_mode='zeros').
    """
    misc.assert_shape(front, [None, None, None, None], 'front')
    batch_size, _, height, width = front.shape
    _check_box(box, batch_size)
    box = box.to(_geometry_dtype(front))
    cx, cy, side = box.unbind(dim=1)
    step = side / out_size
    rows = _resampling_matrix(cy - side / 2, step, out_size, height, border=False).to(front.dtype)   # (B, out, H)
    cols = _resampling_matrix(cx - side / 2, step, out_size, width, border=False).to(front.dtype)    # (B, out, W)
    return rows.unsqueeze(1) @ front @ cols.transpose(1, 2).unsqueeze(1)


def box_mask(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels whose centre lies in the box [cx - side/2, cx + side/2)^2."""
    cx, cy, side = box.reshape(-1, 3, 1, 1).unbind(dim=1)
    x = torch.arange(width, device=box.device, dtype=box.dtype).reshape(1, 1, -1) + 0.5
    y = torch.arange(height, device=box.device, dtype=box.dtype).reshape(1, -1, 1) + 0.5
    inside_x = (x >= cx - side / 2) & (x < cx + side / 2)
    inside_y = (y >= cy - side / 2) & (y < cy + side / 2)
    return (inside_x & inside_y).unsqueeze(1)


def paste_mouth(front: torch.Tensor, patch: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Resample `patch` onto each sample's box and replace `front` there.

    The patch spans the box edge to edge. Pixels whose centre lies inside the box take the
    resampled patch (see the module docstring; the patch's edge pixels extend outward, as
    grid_sample's padding_mode='border'); every other pixel is `front`, bit for bit.

    Args:
        front: (B, C, H, W).
        patch: (B, C, h, w), e.g. the mouth network's output.
        box:   (B, 3) float (cx, cy, side) in pixels of `front`.
    Returns:
        (B, C, H, W).
    """
    misc.assert_shape(front, [None, None, None, None], 'front')
    batch_size, channels, height, width = front.shape
    misc.assert_shape(patch, [batch_size, channels, None, None], 'patch')
    _check_box(box, batch_size)
    box = box.to(_geometry_dtype(front))
    patch = patch.to(front.dtype)
    cx, cy, side = box.unbind(dim=1)
    side = side.clamp(min=1e-6)          # an empty box selects no pixel; avoid dividing by zero
    patch_h, patch_w = patch.shape[2:]
    # Front pixel i covers [i, i + 1): in patch pixels that is [(i - x0) * w / side, ...).
    rows = _resampling_matrix(-(cy - side / 2) * patch_h / side, patch_h / side, height, patch_h, border=True).to(front.dtype)   # (B, H, h)
    cols = _resampling_matrix(-(cx - side / 2) * patch_w / side, patch_w / side, width, patch_w, border=True).to(front.dtype)    # (B, W, w)
    pasted = rows.unsqueeze(1) @ patch @ cols.transpose(1, 2).unsqueeze(1)
    return torch.where(box_mask(box, height, width), pasted, front)
