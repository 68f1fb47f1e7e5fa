"""Crop the mouth region out of the front render and paste a patch back into it, as Next3D.

A box is (x0, y0, side), int64, one per sample: the whole pixels x0 <= column < x0 + side,
y0 <= row < y0 + side. Both directions resample as the official code's
`F.interpolate(mode='bilinear', align_corners=False, antialias=True)`: the crop resizes
the box's pixels to the mouth net's input, the paste resizes the net's output to the box.
Output pixel i of a resize from n_in to n_out pixels (scale s = n_in / n_out) is centred
at input coordinate c_i = s (i + 0.5) and takes the input pixels j with weights
tent((j + 0.5 - c_i) / max(s, 1)), normalised to sum to 1 (tent(t) = max(0, 1 - |t|)):
antialiased (a tent widened by s) when reducing, bilinear when enlarging.

Every sample has its own box, so the resizes are per-sample separable matrices applied
with batched matrix products: no host sync, no loop over samples. On the CPU (where reading
the boxes costs nothing) the products run only over the rows and columns that some box
covers: a small128 mouth box is 18 of the render's 128 pixels wide, and the full-image
products took 4% of an inference.
"""

import torch

from torch_utils import misc

LIP_LANDMARKS = slice(48, 60)          # outer lip, iBUG 68-point order
MOUTH_CORNERS = (48, 54)
MOUTH_BOX_SCALE = 1.2                  # box side ~ 1.2 x the lips' larger extent


def fit_box(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes moved inside an image: side in [1, min(height, width)], then x0, y0 shifted
    so that the box lies inside (the official code has no such case: its boxes, from real
    mouths, lie inside the 256 render, and a box that did not would fail there).

    box: (B, 3) int64 (x0, y0, side) -> (B, 3) int64.
    """
    x0, y0, side = box.unbind(dim=1)
    side = side.clamp(1, min(height, width))
    x0 = torch.minimum(x0.clamp(min=0), width - side)
    y0 = torch.minimum(y0.clamp(min=0), height - side)
    return torch.stack([x0, y0, side], dim=1)


def mouth_box_from_landmarks(landmarks_px: torch.Tensor, image_size: int = 256) -> torch.Tensor:
    """Mouth box of each sample from its landmarks in the front render, as Next3D.

    Args:
        landmarks_px: (B, 68, 2+) iBUG landmarks in front-render pixels (x = column,
                      y = row; NDC * size/2 + size/2); extra columns (depth) ignored.
        image_size:   side of the front render in pixels.
    Returns:
        (B, 3) int64 (x0, y0, side): centre = the midpoint of the mouth corners 48 and 54 cut
        to whole pixels, half = int(1.2 x max(width, height) of the outer lip 48-59) // 2,
        x0, y0 = centre - half, side = 2 * half (at least 2), moved inside the image.
    """
    misc.assert_shape(landmarks_px, [None, 68, None], 'landmarks_px')
    points = landmarks_px[..., :2]
    centre = (points[:, MOUTH_CORNERS[0]] + points[:, MOUTH_CORNERS[1]]) * 0.5
    lips = points[:, LIP_LANDMARKS]
    extent = (lips.amax(dim=1) - lips.amin(dim=1)).amax(dim=1)
    half = (torch.floor(extent * MOUTH_BOX_SCALE).long() // 2).clamp(min=1)   # int() of a non-negative number
    corner = torch.floor(centre).long() - half.unsqueeze(1)
    return fit_box(torch.cat([corner, 2 * half.unsqueeze(1)], dim=1), image_size, image_size)


def _resize_weights(out_index: torch.Tensor, in_index: torch.Tensor, out_size: torch.Tensor, in_size: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """Weights of antialiased bilinear resizes from in_size to out_size pixels (see the module
    docstring), one per sample.

    out_index (B, O, 1) and in_index (B, 1, I): int64 pixel indices of the two grids (they
    may run outside [0, size): those rows and columns get zero weight); out_size,
    in_size (B, 1, 1) int64. Returns (B, O, I) in `dtype`; rows of valid outputs sum to 1.
    """
    scale = in_size.to(dtype) / out_size.to(dtype)
    support = scale.clamp(min=1)
    centre = scale * (out_index.to(dtype) + 0.5)
    weights = (1 - ((in_index.to(dtype) + 0.5 - centre) / support).abs()).clamp(min=0)
    valid = (in_index >= 0) & (in_index < in_size) & (out_index >= 0) & (out_index < out_size)
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    total = weights.sum(dim=2, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def _geometry_dtype(image: torch.Tensor) -> torch.dtype:
    """Weights in at least float32: half precision cannot hold pixel positions of a 256 render."""
    return torch.promote_types(image.dtype, torch.float32)


def _check_box(box: torch.Tensor, batch_size: int):
    misc.assert_shape(box, [batch_size, 3], 'box')
    if box.is_floating_point() or box.is_complex() or box.dtype == torch.bool:
        raise TypeError(f'box: expected an integer (x0, y0, side) tensor of whole pixels, got {box.dtype}')


def _pixels(size: int, device) -> torch.Tensor:
    return torch.arange(size, device=device, dtype=torch.int64)


def _covered(start: torch.Tensor, side: torch.Tensor, size: int) -> slice:
    """The pixels [min start, max start + side) that some sample's box covers on the CPU; all
    `size` pixels elsewhere (reading the boxes would be a host sync on a GPU)."""
    if start.device.type != 'cpu' or start.numel() == 0:
        return slice(0, size)
    return slice(int(start.min()), int((start + side).max()))


def crop_mouth(front: torch.Tensor, box: torch.Tensor, out_size: int = 64) -> torch.Tensor:
    """Each sample's box of `front`, resized to out_size x out_size.

    Equals F.interpolate(front[b:b+1, :, y0:y0+side, x0:x0+side], size=out_size,
    mode='bilinear', antialias=True) per sample (the box moved inside the image first, see
    fit_box).

    Args:
        front: (B, C, H, W) image or feature render.
        box:   (B, 3) int (x0, y0, side) whole pixels.
    Returns:
        (B, C, out_size, out_size).
    """
    misc.assert_shape(front, [None, None, None, None], 'front')
    batch_size, _, height, width = front.shape
    _check_box(box, batch_size)
    x0, y0, side = fit_box(box.long(), height, width).reshape(batch_size, 3, 1, 1).unbind(dim=1)   # each (B, 1, 1)
    dtype = _geometry_dtype(front)
    ys, xs = _covered(y0, side, height), _covered(x0, side, width)          # weights elsewhere are 0
    out = _pixels(out_size, front.device).reshape(1, -1, 1)
    out_side = torch.full_like(side, out_size)          # on the device: a CPU constant keeps a graph from CUDA graph capture
    rows = _resize_weights(out, _pixels(height, front.device)[ys].reshape(1, 1, -1) - y0, out_side, side, dtype)
    cols = _resize_weights(out, _pixels(width, front.device)[xs].reshape(1, 1, -1) - x0, out_side, side, dtype)
    rows, cols = rows.to(front.dtype), cols.to(front.dtype)                 # (B, out, H'), (B, out, W')
    return rows.unsqueeze(1) @ front[:, :, ys, xs] @ cols.transpose(1, 2).unsqueeze(1)


def box_mask(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) bool: the pixels of each (fitted) box, x0 <= column < x0 + side and
    y0 <= row < y0 + side."""
    _check_box(box, box.shape[0])
    x0, y0, side = fit_box(box.long(), height, width).reshape(-1, 3, 1, 1).unbind(dim=1)
    x = _pixels(width, box.device).reshape(1, 1, -1)
    y = _pixels(height, box.device).reshape(1, -1, 1)
    inside = (x >= x0) & (x < x0 + side) & (y >= y0) & (y < y0 + side)
    return inside.unsqueeze(1)


def paste_mouth(front: torch.Tensor, patch: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """`patch` resized to each sample's box and written over `front` there.

    Equals front with front[b, :, y0:y0+side, x0:x0+side] = F.interpolate(patch[b:b+1],
    size=side, mode='bilinear', antialias=True) per sample (the box moved inside the image
    first, see fit_box); every other pixel is `front`, bit for bit.

    Args:
        front: (B, C, H, W).
        patch: (B, C, h, w), e.g. the mouth network's output.
        box:   (B, 3) int (x0, y0, side) whole pixels of `front`.
    Returns:
        (B, C, H, W).
    """
    misc.assert_shape(front, [None, None, None, None], 'front')
    batch_size, channels, height, width = front.shape
    misc.assert_shape(patch, [batch_size, channels, None, None], 'patch')
    _check_box(box, batch_size)
    box = fit_box(box.long(), height, width)
    x0, y0, side = box.reshape(batch_size, 3, 1, 1).unbind(dim=1)
    dtype = _geometry_dtype(front)
    patch_h, patch_w = patch.shape[2:]
    ys, xs = _covered(y0, side, height), _covered(x0, side, width)          # the pixels that change
    rows = _resize_weights(_pixels(height, front.device)[ys].reshape(1, -1, 1) - y0, _pixels(patch_h, front.device).reshape(1, 1, -1),
                           side, torch.full_like(side, patch_h), dtype)
    cols = _resize_weights(_pixels(width, front.device)[xs].reshape(1, -1, 1) - x0, _pixels(patch_w, front.device).reshape(1, 1, -1),
                           side, torch.full_like(side, patch_w), dtype)
    rows, cols = rows.to(front.dtype), cols.to(front.dtype)                 # (B, H', h), (B, W', w)
    pasted = rows.unsqueeze(1) @ patch.to(front.dtype) @ cols.transpose(1, 2).unsqueeze(1)
    if (ys.stop - ys.start, xs.stop - xs.start) == (height, width):
        return torch.where(box_mask(box, height, width), pasted, front)
    out = front.clone()
    out[:, :, ys, xs] = torch.where(box_mask(box, height, width)[:, :, ys, xs], pasted, front[:, :, ys, xs])
    return out
