"""Mouth box, crop and paste as Next3D: whole-pixel boxes, F.interpolate(bilinear, antialias) both ways."""

import pytest
import torch
import torch.nn.functional as F

from training import mouth
from training.mouth import box_mask, crop_mouth, fit_box, mouth_box_from_landmarks, paste_mouth


def resize(image, size):
    """The official resampling: bilinear, antialiased, align_corners=False."""
    return F.interpolate(image, size=(size, size), mode='bilinear', align_corners=False, antialias=True)


def lip_landmarks(corner_left, corner_right, others):
    """(68, 2) pixel landmarks: corners 48 and 54 given, lip points 49-53 and 55-59 from
    `others` (10 points), the rest far away (they must play no part)."""
    lms = torch.full((68, 2), 999.0)
    lms[48], lms[54] = torch.tensor(corner_left), torch.tensor(corner_right)
    lms[[49, 50, 51, 52, 53, 55, 56, 57, 58, 59]] = torch.tensor(others, dtype=torch.float32)
    return lms


def test_mouth_box_from_landmarks_whole_pixels():
    # Face 0: corners (100.3, 150.2) and (160.9, 151.7) -> centre (130.6, 150.95), cut to
    # (130, 150). Lip extents: x 100.3..160.9 = 60.6, y 140..165.5 = 25.5; 1.2 * 60.6 = 72.72
    # -> int 72 -> half 36: box columns 94..165, rows 114..185 (x0, y0, side) = (94, 114, 72).
    face0 = lip_landmarks([100.3, 150.2], [160.9, 151.7], [[110, 140], [120, 141], [130, 142], [140, 141], [150, 145],
                                                          [150, 160], [140, 165.5], [130, 165], [120, 164], [110, 158]])
    # Face 1: the height dominates: y 40..101 = 61, 1.2 * 61 = 73.2 -> int 73 -> half 36 (the
    # side stays even, 72); corners (50.5, 60.5), (70.5, 61.5) -> centre (60.5, 61) -> (60, 61).
    face1 = lip_landmarks([50.5, 60.5], [70.5, 61.5], [[55, 40], [60, 41], [62, 42], [64, 45], [66, 50],
                                                      [66, 90], [64, 101], [60, 100], [56, 95], [54, 80]])
    # Face 2: near the right edge: centre (252.1, 128.3) -> (252, 128), extent 19.8 -> 23.76
    # -> int 23 -> half 11, side 22: columns 241..262 leave the 256 image; the box moves left
    # to 234..255 (rows 117..138).
    face2 = lip_landmarks([242.2, 128.3], [262.0, 128.3], [[245, 125], [250, 124], [255, 124], [258, 126], [260, 128],
                                                          [258, 130], [255, 131], [250, 131], [246, 130], [244, 129]])
    # Face 3: lips 1 px wide: 1.2 -> int 1 -> half 0 would be an empty box; the smallest box is 2.
    face3 = lip_landmarks([100.0, 100.0], [101.0, 100.0], [[100.5, 100.0]] * 10)
    box = mouth_box_from_landmarks(torch.stack([face0, face1, face2, face3]), image_size=256)
    assert box.dtype == torch.int64
    assert box.tolist() == [[94, 114, 72], [24, 25, 72], [234, 117, 22], [99, 99, 2]]
    # Depth columns (B, 68, 3) are ignored.
    with_depth = torch.cat([torch.stack([face0, face1]), torch.rand(2, 68, 1)], dim=2)
    assert torch.equal(mouth_box_from_landmarks(with_depth), box[:2])


def test_fit_box_moves_boxes_into_the_image():
    # Past the right and top edges; wider than the image (side 36, rows 2..37 fit); empty.
    box = torch.tensor([[30, -5, 16], [-3, 2, 100], [4, 5, 0]])
    assert fit_box(box, height=40, width=36).tolist() == [[20, 0, 16], [0, 2, 36], [4, 5, 1]]


def test_crop_is_interpolate_of_the_whole_pixel_slice():
    torch.manual_seed(0)
    front = torch.rand(4, 2, 40, 36, dtype=torch.float64)
    # Reduction 24 -> 16, same size (a plain copy), enlargements 9 -> 16 and 2 -> 16.
    box = torch.tensor([[5, 7, 24], [10, 3, 16], [0, 31, 9], [34, 0, 2]])
    crop = crop_mouth(front, box, out_size=16)
    assert crop.shape == (4, 2, 16, 16)
    for b, (x0, y0, side) in enumerate(box.tolist()):
        expected = resize(front[b:b + 1, :, y0:y0 + side, x0:x0 + side], 16)
        torch.testing.assert_close(crop[b:b + 1], expected, atol=1e-12, rtol=0)
    assert torch.equal(crop[1], front[1, :, 3:19, 10:26])
    # float32, as the generator runs it.
    crop32 = crop_mouth(front.float(), box, out_size=16)
    for b, (x0, y0, side) in enumerate(box.tolist()):
        expected = resize(front[b:b + 1, :, y0:y0 + side, x0:x0 + side].float(), 16)
        torch.testing.assert_close(crop32[b:b + 1], expected, atol=2e-6, rtol=0)


def test_paste_is_interpolate_into_the_slice():
    torch.manual_seed(0)
    front = torch.rand(3, 2, 40, 40, dtype=torch.float64)
    patch = torch.rand(3, 2, 32, 32, dtype=torch.float64) + 5
    # Reduction 32 -> 20 (as 256 -> ~72 in Next3D), enlargement 32 -> 36, a copy 32 -> 32.
    box = torch.tensor([[3, 11, 20], [2, 1, 36], [8, 0, 32]])
    out = paste_mouth(front, patch, box)
    expected = front.clone()
    for b, (x0, y0, side) in enumerate(box.tolist()):
        expected[b, :, y0:y0 + side, x0:x0 + side] = resize(patch[b:b + 1], side)[0]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    mask = box_mask(box, 40, 40).expand_as(front)
    assert torch.equal(out[~mask], front[~mask])              # bit for bit outside the box
    assert (out[mask] >= 5).all()
    assert torch.equal(out[2, :, :32, 8:40], patch[2])


def test_box_mask_selects_half_open_whole_pixels():
    # A box of side 4 starting at column 9, row 5: columns 9..12 and rows 5..8, exactly 4 x 4.
    mask = box_mask(torch.tensor([[9, 5, 4]]), 16, 20)
    expected = torch.zeros(1, 1, 16, 20, dtype=torch.bool)
    expected[..., 5:9, 9:13] = True
    assert torch.equal(mask, expected)
    assert mask.sum() == 16


def test_crop_and_paste_read_the_fitted_box():
    torch.manual_seed(0)
    front = torch.rand(1, 3, 40, 36)
    outside, inside = torch.tensor([[30, -5, 16]]), torch.tensor([[20, 0, 16]])
    assert torch.equal(crop_mouth(front, outside, 8), crop_mouth(front, inside, 8))
    patch = torch.rand(1, 3, 8, 8)
    assert torch.equal(paste_mouth(front, patch, outside), paste_mouth(front, patch, inside))
    assert torch.equal(box_mask(outside, 40, 36), box_mask(inside, 40, 36))


def test_mouth_gradcheck_and_errors():
    torch.manual_seed(0)
    front = torch.rand(1, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    patch = torch.rand(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    box = torch.tensor([[2, 3, 5]])
    assert torch.autograd.gradcheck(lambda f: crop_mouth(f, box, 3), (front,))
    assert torch.autograd.gradcheck(lambda f, p: paste_mouth(f, p, box), (front, patch))
    with pytest.raises(AssertionError, match='box'):
        crop_mouth(front, torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(TypeError, match='integer'):
        crop_mouth(front, torch.tensor([[2.0, 3.0, 5.0]]), 3)
    with pytest.raises(AssertionError, match='patch'):
        paste_mouth(front, torch.zeros(1, 3, 4, 4, dtype=torch.float64), box)


def test_half_precision_front():
    torch.manual_seed(0)
    front = torch.rand(1, 2, 256, 256)
    box = torch.tensor([[170, 150, 62]])
    reference = crop_mouth(front, box, 16)
    half = crop_mouth(front.to(torch.bfloat16), box, 16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, atol=2e-2, rtol=0)
    pasted = paste_mouth(front.to(torch.bfloat16), reference.to(torch.bfloat16), box)
    mask = box_mask(box, 256, 256).expand_as(front)
    assert torch.equal(pasted[~mask], front.to(torch.bfloat16)[~mask])


def test_covered_window_equals_the_whole_image_products(monkeypatch):
    """On the CPU the products run over the rows and columns some box covers; the whole-image
    products (what other devices run) give the same crop and paste."""
    torch.manual_seed(0)
    front = torch.rand(3, 2, 40, 36, dtype=torch.float64)
    patch = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    box = torch.tensor([[5, 7, 12], [10, 3, 16], [4, 20, 9]])
    assert mouth._covered(box[:, 1], box[:, 2], 40) == slice(3, 29)
    windowed = crop_mouth(front, box, 8), paste_mouth(front, patch, box)
    monkeypatch.setattr(mouth, '_covered', lambda start, side, size: slice(0, size))
    whole = crop_mouth(front, box, 8), paste_mouth(front, patch, box)
    for a, b in zip(windowed, whole):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_empty_batch():
    front, box = torch.rand(0, 2, 16, 16), torch.zeros(0, 3, dtype=torch.long)
    assert crop_mouth(front, box, 4).shape == (0, 2, 4, 4)
    assert paste_mouth(front, torch.rand(0, 2, 4, 4), box).shape == (0, 2, 16, 16)


def test_crop_and_paste_trace_without_tensors_made_from_python_numbers():
    """torch.tensor(16) in a traced graph is a CPU constant, and cudagraph trees skip every graph that
    holds a CPU tensor (torch.compile's cudagraphs backend): the mouth's resize weights made the graph
    holding the mouth network, blending and backbone run without CUDA graphs. Sizes are made on the
    boxes' device."""
    import torch._dynamo
    graphs = []

    def probe(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    front, patch = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 8, 8)
    box = torch.tensor([[4, 6, 12], [0, 2, 20]])
    torch._dynamo.reset()
    crop = torch.compile(lambda f, b: mouth.crop_mouth(f, b, out_size=8), backend=probe, dynamic=False)
    paste = torch.compile(mouth.paste_mouth, backend=probe, dynamic=False)
    torch.testing.assert_close(crop(front, box), mouth.crop_mouth(front, box, out_size=8))
    torch.testing.assert_close(paste(front, patch, box), mouth.paste_mouth(front, patch, box))
    assert graphs
    made = [(n.op, str(n.target)) for gm in graphs for n in gm.graph.nodes
            if n.op == 'get_attr' or (n.op == 'call_function' and n.target in (torch.tensor, torch.as_tensor))]
    assert not made, made
