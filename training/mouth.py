"""Crop the mouth region out of the front render and paste a patch back into it.

Pixel convention: image coordinates are continuous, in pixels, with the origin at the
top-left corner of the image; pixel i (column or row) covers [i, i + 1) and has its centre
at i + 0.5. This is grid_sample's align_corners=False convention, and the mouth box of
spec section 4 (landmark NDC * 128 + 128 on a 256 render) is expressed in it.

A box is (cx, cy, side): the square [cx - side/2, cx + side/2) x [cy - side/2, cy + side/2),
floats, one per sample. Both directions resample with a per-sample separable matrix: output
pixel j has a footprint of width max(step, 1) input pixels centred on its centre, and takes
the input pixels' overlap with that footprint as weights. For enlargement (step < 1) this is
exactly bilinear interpolation; for reduction it is an area average over the footprint
(antialiased). Everything is batched tensor algebra: no host sync, no loop over samples.
"""

import torch

from torch_utils import misc


def _resampling_matrix(start: torch.Tensor, step: torch.Tensor, num_out: int, num_in: int, border: bool) -> torch.Tensor:
    """Weights (B, num_out, num_in) of a 1D area/bilinear resampling.

    Output pixel j stands for the input interval [start + j * step, start + (j + 1) * step)
    (input pixel units); its weights are the overlaps of the input pixels with a footprint of
    width max(step, 1) around that interval's centre, divided by the footprint width.
    border=False: outside the input counts as zeros. border=True: the first and last input
    pixels extend to infinity (clamp-to-edge); rows then sum to exactly 1.
    """
    start, step = start.reshape(-1, 1, 1), step.reshape(-1, 1, 1)
    j = torch.arange(num_out, device=start.device, dtype=start.dtype).reshape(1, -1, 1)
    centre = start + (j + 0.5) * step
    width = step.clamp(min=1)
    low, high = centre - width / 2, centre + width / 2                   # (B, num_out, 1)
    cell_low = torch.arange(num_in, device=start.device, dtype=start.dtype).reshape(1, 1, -1)
    cell_high = cell_low + 1
    if border:
        inf = torch.tensor(float('inf'), device=start.device, dtype=start.dtype)
        cell_low = torch.where(cell_low == 0, -inf, cell_low)
        cell_high = torch.where(cell_high == num_in, inf, cell_high)
    overlap = (torch.minimum(high, cell_high) - torch.maximum(low, cell_low)).clamp(min=0)
    return overlap / width


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
        (B, C, out_size, out_size); parts of a box outside the image read zeros.
    """
    misc.assert_shape(front, [None, None, None, None], 'front')
    batch_size, _, height, width = front.shape
    _check_box(box, batch_size)
    box = box.to(front.dtype)
    cx, cy, side = box.unbind(dim=1)
    step = side / out_size
    rows = _resampling_matrix(cy - side / 2, step, out_size, height, border=False)   # (B, out, H)
    cols = _resampling_matrix(cx - side / 2, step, out_size, width, border=False)    # (B, out, W)
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
    resampled patch (bilinear when the box is larger than the patch, area average when
    smaller, clamp-to-edge at the patch border); every other pixel is `front`, bit for bit.

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
    box = box.to(front.dtype)
    patch = patch.to(front.dtype)
    cx, cy, side = box.unbind(dim=1)
    patch_h, patch_w = patch.shape[2:]
    # Front pixel i covers [i, i + 1): in patch pixels that is [(i - x0) * w / side, ...).
    rows = _resampling_matrix(-(cy - side / 2) * patch_h / side, patch_h / side, height, patch_h, border=True)   # (B, H, h)
    cols = _resampling_matrix(-(cx - side / 2) * patch_w / side, patch_w / side, width, patch_w, border=True)    # (B, W, w)
    pasted = rows.unsqueeze(1) @ patch @ cols.transpose(1, 2).unsqueeze(1)
    return torch.where(box_mask(box, height, width), pasted, front)
