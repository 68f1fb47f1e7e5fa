"""Mouth crop and paste: box geometry, antialiased resampling, exact paste outside the box."""

import numpy as np
import pytest
import torch

from training.mouth import box_mask, crop_mouth, mouth_box_from_landmarks, paste_mouth


def ramp_image(batch=1, channels=2, height=48, width=40, dtype=torch.float64):
    """Channel 0 = x, channel 1 = y of each pixel centre (x = column + 0.5, y = row + 0.5)."""
    y, x = torch.meshgrid(torch.arange(height, dtype=dtype) + 0.5, torch.arange(width, dtype=dtype) + 0.5, indexing='ij')
    image = torch.stack([x, y] + [x + 2 * y] * (channels - 2))
    return image.expand(batch, -1, -1, -1).clone()


def test_crop_of_linear_ramp_reads_footprint_centres():
    # Bilinear reconstruction keeps a linear ramp linear, and its mean over a footprint is
    # its value at the footprint's centre, so
    # every output pixel j of a box (cx, cy, side) reads x = cx - side/2 + (j + 0.5) side/n.
    image = ramp_image(batch=3)
    box = torch.tensor([[20.0, 24.0, 16.0], [17.3, 21.9, 23.7], [12.25, 30.5, 5.0]], dtype=torch.float64)
    out_size = 8
    crop = crop_mouth(image, box, out_size)
    assert crop.shape == (3, 2, 8, 8)
    j = torch.arange(out_size, dtype=torch.float64) + 0.5
    for b, (cx, cy, side) in enumerate(box.tolist()):
        x = cx - side / 2 + j * side / out_size
        y = cy - side / 2 + j * side / out_size
        torch.testing.assert_close(crop[b, 0], x.expand(out_size, -1), atol=1e-10, rtol=0)
        torch.testing.assert_close(crop[b, 1], y[:, None].expand(-1, out_size), atol=1e-10, rtol=0)


def test_crop_antialiases_a_checkerboard():
    # One-pixel checkerboard, box 16 px -> 8 px: every output averages a 2 x 2 block, 0.5.
    # Point sampling (plain bilinear grid_sample at the output centres) would read 0 or 1.
    y, x = np.mgrid[:32, :32]
    board = torch.tensor((x + y) % 2, dtype=torch.float64)[None, None]
    crop = crop_mouth(board, torch.tensor([[16.0, 16.0, 16.0]], dtype=torch.float64), 8)
    torch.testing.assert_close(crop, torch.full_like(crop, 0.5), atol=1e-12, rtol=0)
    # A box of 12 px -> 8: footprints of 1.5 px. The bilinear reconstruction of the board is
    # (1 - Z(x) Z(y)) / 2 with Z a triangle wave of amplitude 1 and period 2, whose mean over
    # any 1.5 px window is at most 0.25 in size, so outputs stay within 0.25^2 / 2 of 0.5.
    crop = crop_mouth(board, torch.tensor([[16.0, 16.0, 12.0]], dtype=torch.float64), 8)
    assert (crop - 0.5).abs().max() <= 0.25 ** 2 / 2 + 1e-12


def supersampled_reference(image, box, out_size, padding_mode, samples=64):
    """Independent reference: the mean of grid_sample's bilinear reconstruction
    (align_corners=False) over each output pixel's footprint, by the midpoint rule with
    samples x samples points per output pixel."""
    batch, channels, height, width = image.shape
    cx, cy, side = box.unbind(1)
    t = (torch.arange(out_size * samples, dtype=image.dtype) + 0.5) / (out_size * samples)   # fractions of the box
    x = (cx - side / 2)[:, None] + t[None] * side[:, None]                                     # (B, n) pixels
    y = (cy - side / 2)[:, None] + t[None] * side[:, None]
    grid = torch.stack(torch.broadcast_tensors((x * 2 / width - 1)[:, None, :], (y * 2 / height - 1)[:, :, None]), dim=-1)
    dense = torch.nn.functional.grid_sample(image, grid, mode='bilinear', padding_mode=padding_mode, align_corners=False)
    return torch.nn.functional.avg_pool2d(dense, samples)


def test_crop_matches_supersampled_bilinear_reconstruction():
    torch.manual_seed(0)
    image = torch.rand(3, 2, 20, 24, dtype=torch.float64)
    # Reduction by 2.6 and 1.3, enlargement by 2, and a box that leaves the image.
    box = torch.tensor([[12.0, 10.0, 15.6], [11.3, 9.4, 7.8], [6.2, 14.9, 3.0], [3.0, 17.0, 12.0]], dtype=torch.float64)
    image = torch.cat([image, image[:1]])
    crop = crop_mouth(image, box, 6)
    reference = supersampled_reference(image, box, 6, 'zeros')
    # The midpoint rule on a piecewise bilinear function: error O(h^2) away from the kinks,
    # O(h) on the few sub-samples that straddle one. Measured: 9e-5 at 64 x 64 sub-samples,
    # 1.6e-5 at 128 x 128 (it converges to the closed form).
    torch.testing.assert_close(crop, reference, atol=2e-4, rtol=0)


def test_paste_matches_supersampled_bilinear_reconstruction():
    torch.manual_seed(0)
    patch = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    front = torch.zeros(2, 2, 24, 24, dtype=torch.float64)
    box = torch.tensor([[12.0, 12.0, 24.0], [10.4, 13.1, 5.3]], dtype=torch.float64)   # enlarge 3x, reduce 1.5x
    out = paste_mouth(front, patch, box)
    # The same footprint means, seen from the patch: the whole-image box maps every front
    # pixel to a 1/3 patch-pixel footprint.
    reference = supersampled_reference(patch[:1], torch.tensor([[4.0, 4.0, 8.0]], dtype=torch.float64), 24, 'border')
    torch.testing.assert_close(out[:1], reference, atol=2e-4, rtol=0)
    # General box: front pixel i covers patch coordinates [(i - x0) w / side, (i + 1 - x0) w / side),
    # i.e. a crop of the patch with a box spanning the whole front image.
    cx, cy, side = box[1].tolist()
    scale = 8 / side
    left, top = -(cx - side / 2) * scale, -(cy - side / 2) * scale
    patch_box = torch.tensor([[left + 12 * scale, top + 12 * scale, 24 * scale]], dtype=torch.float64)
    reference = supersampled_reference(patch[1:], patch_box, 24, 'border')
    mask = box_mask(box[1:], 24, 24).expand_as(reference)
    torch.testing.assert_close(out[1:][mask], reference[mask], atol=2e-4, rtol=0)
    # Close to plain bilinear interpolation for an enlargement: a footprint of width w
    # (1/3 here) around a kink between slopes s1 and s2 moves its mean by |s2 - s1| w / 8,
    # with |s2 - s1| <= 2 for values in [0, 1], on each axis.
    bilinear = torch.nn.functional.interpolate(patch[:1], size=24, mode='bilinear', align_corners=False)
    assert (out[:1] - bilinear).abs().max() <= 2 * 2 * (1 / 3) / 8
    # A 2x enlargement puts every footprint between two pixel centres: exactly bilinear.
    twice = paste_mouth(front[:1, :, :16, :16], patch[:1], torch.tensor([[8.0, 8.0, 16.0]], dtype=torch.float64))
    torch.testing.assert_close(twice, torch.nn.functional.interpolate(patch[:1], size=16, mode='bilinear', align_corners=False))


def test_crop_batch_with_different_boxes_equals_one_by_one():
    torch.manual_seed(0)
    image = torch.rand(3, 4, 64, 64)
    box = torch.tensor([[32.0, 40.0, 20.0], [30.5, 35.2, 48.0], [10.0, 60.0, 30.0]])   # the last one leaves the image
    batched = crop_mouth(image, box, 16)
    for b in range(3):
        torch.testing.assert_close(batched[b:b + 1], crop_mouth(image[b:b + 1], box[b:b + 1], 16))
    # Outside the image reads zeros: the bottom rows of the last box lie below row 64.
    assert (batched[2, :, -3:] == 0).all() and (batched[2, :, :8] != 0).any()


def test_box_mask_from_pixel_centres():
    mask = box_mask(torch.tensor([[10.3, 12.7, 5.2]]), 24, 20)
    # x in [7.7, 12.9): centres 8.5 .. 12.5 -> columns 8..12; y in [10.1, 15.3): rows 10..14.
    expected = torch.zeros(1, 1, 24, 20, dtype=torch.bool)
    expected[..., 10:15, 8:13] = True
    assert torch.equal(mask, expected)


def test_paste_changes_only_the_box():
    torch.manual_seed(0)
    front = torch.rand(2, 3, 32, 32)
    patch = torch.rand(2, 3, 64, 64) + 5
    box = torch.tensor([[16.0, 20.0, 10.0], [8.4, 9.9, 17.3]])
    out = paste_mouth(front, patch, box)
    mask = box_mask(box, 32, 32).expand_as(front)
    assert torch.equal(out[~mask], front[~mask])             # bit for bit outside
    assert (out[mask] >= 5).all()                              # the patch everywhere inside
    assert mask[0].sum() == 3 * 10 * 10


def test_crop_then_paste_reproduces_the_box():
    image = ramp_image(channels=2, height=64, width=64)
    box = torch.tensor([[30.0, 34.0, 40.0]], dtype=torch.float64)
    patch = crop_mouth(image, box, 64)
    out = paste_mouth(torch.zeros_like(image), patch, box)
    mask = box_mask(box, 64, 64)[0, 0]
    # Bilinear interpolation of a linear ramp is exact between the patch's pixel centres;
    # the outermost half patch pixel (0.31 px of front) is clamped to the edge value.
    inner = torch.zeros_like(mask)
    inner[15:53, 11:49] = True
    assert (mask & inner).sum() == inner.sum()
    torch.testing.assert_close(out[0][:, inner], image[0][:, inner], atol=1e-10, rtol=0)
    assert (out[0][:, mask] - image[0][:, mask]).abs().max() <= 0.5 * 40 / 64 + 1e-10


def test_mouth_box_from_landmarks():
    landmarks = torch.zeros(2, 68, 3)
    lips = torch.tensor([[-0.2, 0.1], [0.2, 0.1], [0.0, 0.2], [0.0, 0.0]])   # width 0.4, height 0.2 in NDC
    landmarks[:, 48:52, :2] = lips
    landmarks[:, 52:60, :2] = lips[3]
    landmarks[:, 48, :2], landmarks[:, 54, :2] = lips[0], lips[1]
    landmarks[1, 48:60, :2] += 0.5                              # the second face's mouth moved
    landmarks[:, :48] = 7.0                                     # other landmarks play no part
    box = mouth_box_from_landmarks(landmarks, image_size=256)
    # Pixels = NDC * 128 + 128: centre (0, 0.1) -> (128, 140.8); extent 0.4 * 128 = 51.2 -> side floor(61.44) = 61.
    torch.testing.assert_close(box, torch.tensor([[128.0, 140.8, 61.0], [192.0, 204.8, 61.0]]))


def test_mouth_gradcheck_and_errors():
    torch.manual_seed(0)
    front = torch.rand(1, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    patch = torch.rand(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    box = torch.tensor([[4.3, 5.1, 5.5]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: crop_mouth(f, box, 3), (front,))
    assert torch.autograd.gradcheck(lambda f, p: paste_mouth(f, p, box), (front, patch))
    with pytest.raises(AssertionError, match='box'):
        crop_mouth(front, torch.zeros(2, 3, dtype=torch.float64), 3)
    with pytest.raises(TypeError, match='floating-point'):
        crop_mouth(front, torch.zeros(1, 3, dtype=torch.long), 3)
    with pytest.raises(AssertionError, match='patch'):
        paste_mouth(front, torch.zeros(1, 3, 4, 4, dtype=torch.float64), box)


def test_half_precision_front_keeps_box_geometry():
    torch.manual_seed(0)
    front = torch.rand(1, 2, 256, 256)
    box = torch.tensor([[200.3, 180.7, 61.0]])
    reference = crop_mouth(front, box, 16)
    half = crop_mouth(front.to(torch.bfloat16), box, 16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, atol=2e-2, rtol=0)
    pasted = paste_mouth(front.to(torch.bfloat16), reference.to(torch.bfloat16), box)
    assert torch.equal(box_mask(box, 256, 256), box_mask(box.double(), 256, 256))
    mask = box_mask(box, 256, 256).expand_as(front)
    assert torch.equal(pasted[~mask], front.to(torch.bfloat16)[~mask])
