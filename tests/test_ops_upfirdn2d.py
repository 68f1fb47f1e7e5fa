"""upfirdn2d reference: against a direct sum over the definition, hand values, gradients."""

import numpy as np
import pytest
import torch

from torch_utils.ops import upfirdn2d as U


def _upfirdn2d_loop(x: np.ndarray, f: np.ndarray, up, down, padding, flip_filter, gain) -> np.ndarray:
    """The definition as slow loops: zero-insert, pad/crop, valid true convolution (or
    correlation), decimate. x [N, C, H, W], f 2-D [fh, fw] (already the full 2-D filter)."""
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding
    n, c, h, w = x.shape
    u = np.zeros([n, c, h * upy, w * upx])
    u[:, :, ::upy, ::upx] = x
    # Pad into a big canvas, then cut out the padded/cropped window.
    big = np.zeros([n, c, h * upy + 2 * abs(py0) + 2 * abs(py1) + 2, w * upx + 2 * abs(px0) + 2 * abs(px1) + 2])
    oy, ox = abs(py0) + 1, abs(px0) + 1
    big[:, :, oy: oy + h * upy, ox: ox + w * upx] = u
    p = big[:, :, oy - py0: oy + h * upy + py1, ox - px0: ox + w * upx + px1]
    fh, fw = f.shape
    out_h, out_w = p.shape[2] - fh + 1, p.shape[3] - fw + 1
    conv = np.zeros([n, c, out_h, out_w])
    for yy in range(out_h):
        for xx in range(out_w):
            for ky in range(fh):
                for kx in range(fw):
                    if flip_filter:
                        conv[:, :, yy, xx] += f[ky, kx] * p[:, :, yy + ky, xx + kx]
                    else:
                        conv[:, :, yy, xx] += f[ky, kx] * p[:, :, yy + fh - 1 - ky, xx + fw - 1 - kx]
    return conv[:, :, ::downy, ::downx] * gain


CASES = [
    # up, down, padding, flip_filter, gain, filter taps, separable
    (1, 1, 0, False, 1.0, [[1, 2, 3], [4, 5, 6]], False),
    (2, 1, [2, 1, 2, 1], False, 4.0, [1, 3, 3, 1], False),
    (1, 2, [1, 1, 1, 1], True, 1.0, [1, 3, 3, 1], False),
    (4, 1, [1, -2, 3, 0], False, 2.5, [[1, 0.5], [-2, 3], [0.25, 1]], False),
    (1, 4, [-1, 2, 0, -1], True, 0.5, [[1, 2, 3, 4, 5]], False),
    ((1, 2), (2, 1), [1, 2, -1, 1], False, 1.0, [1, 2, 3, 4, 5, 6, 7, 8], True),
    (2, 2, [-1, -1, 2, 2], True, 3.0, [1, -1, 2, 5, 1, 1, 3, 2], True),
    (4, 2, [3, 2, 1, 0], False, 1.0, [[2, 1, 0], [1, 3, 1], [0, 1, 4]], False),
    # No upsampling, symmetric padding per axis (the convolution pads), with a crop and strides.
    (1, 2, [-1, -1, 2, 2], False, 1.0, [1, 3, 3, 1], True),
    (1, (2, 3), [1, 1, 2, 2], True, 2.0, [[1, 2, 0], [3, 1, 1], [0, 2, 5]], False),
]

# Upsampling without decimation whose padding a transposed convolution can express
# (`_upsample_transposed`): output_padding 0 and > 0, crops, flips, 1-D and 2-D filters.
TRANSPOSED_CASES = [
    (2, 1, [2, 1, 2, 1], False, 4.0, [1, 3, 3, 1], False),
    (2, 1, [2, 2, 2, 2], True, 2.0, [1, -2, 3, 5], True),
    (3, 1, [2, 0, 1, 0], False, 1.5, [[1, 2, 3], [4, 5, 6], [7, 8, -1]], False),
    ((2, 3), 1, [2, 1, 2, 0], True, 1.0, [[1, 2, 3, 4], [5, 6, 7, 8], [1, 0, 1, 0], [2, 2, 1, -1]], False),
    (2, 1, [-1, -1, 2, 1], False, 1.0, [1, 3, 3, 1], True),
    ((1, 2), 1, [1, 1, 2, 1], False, 1.0, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]], False),
]
CASES += TRANSPOSED_CASES


@pytest.mark.parametrize('up, down, padding, flip_filter, gain, taps, separable', CASES)
def test_matches_direct_sum(up, down, padding, flip_filter, gain, taps, separable):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    f = U.setup_filter(taps, normalize=False, separable=separable)
    y = U.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    f2 = f.numpy().astype(np.float64)
    f2 = np.outer(f2, f2) if f2.ndim == 1 else f2
    expected = _upfirdn2d_loop(x.numpy(), f2, U.parse_scaling(up), U.parse_scaling(down), U.parse_padding(padding), flip_filter, gain)
    assert y.shape == expected.shape
    assert y.shape[2:] == U.output_size(x.shape[2:], f, up, down, padding)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_impulse_response_orientation():
    # flip_filter=False is a true convolution: an impulse at the origin reproduces f as is.
    taps = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x = torch.zeros(1, 1, 4, 5)
    x[0, 0, 0, 0] = 1
    y = U.upfirdn2d(x, taps, padding=[2, 0, 1, 0])
    assert torch.equal(y[0, 0, :2, :3], taps)
    assert y.abs().sum() == taps.sum()
    # flip_filter=True is a correlation: an impulse at the far corner reproduces f rotated by 180 degrees.
    x = torch.zeros(1, 1, 4, 5)
    x[0, 0, 3, 4] = 1
    y = U.upfirdn2d(x, taps, padding=[0, 2, 0, 1], flip_filter=True)
    assert torch.equal(y[0, 0, 2:, 2:], taps.flip([0, 1]))


def test_hand_values_upsample_1d():
    # Upsample [1, 2] along x by 2 with the box [[1, 1]] (normalized to [[.5, .5]], gain 2):
    # zero-insert [1, 0, 2, 0], pad one zero on the left, box sum -> [1, 1, 2, 2].
    x = torch.tensor([[[[1.0, 2.0]]]])
    f = U.setup_filter([[1, 1]])
    y = U.upsample2d(x, f, up=(2, 1))
    assert torch.allclose(y, torch.tensor([[[[1.0, 1.0, 2.0, 2.0]]]]))


def test_resample_helpers_sizes_and_constants():
    x = torch.full([1, 2, 8, 10], 3.0, dtype=torch.float64)
    f = U.setup_filter([1, 3, 3, 1])
    up = U.upsample2d(x, f)
    assert up.shape == (1, 2, 16, 20)
    assert torch.allclose(up[:, :, 2:-2, 2:-2], torch.full_like(up[:, :, 2:-2, 2:-2], 3.0))
    up = U.upsample2d(x, f, up=(4, 2))
    assert up.shape == (1, 2, 16, 40)
    down = U.downsample2d(x, f)
    assert down.shape == (1, 2, 4, 5)
    assert torch.allclose(down[:, :, 1:-1, 1:-1], torch.full_like(down[:, :, 1:-1, 1:-1], 3.0))
    assert U.downsample2d(x, f, down=(2, 4)).shape == (1, 2, 2, 5)
    same = U.filter2d(x, U.setup_filter([1, 2, 1]))
    assert same.shape == x.shape
    assert torch.allclose(same[:, :, 1:-1, 1:-1], x[:, :, 1:-1, 1:-1])
    # Odd and even 2-D filters keep the size too.
    assert U.filter2d(x, U.setup_filter([[1, 2], [3, 4]])).shape == x.shape


def test_setup_filter():
    f = U.setup_filter([1, 3, 3, 1])
    assert f.dtype == torch.float32 and f.shape == (4, 4)
    assert torch.allclose(f.sum(), torch.tensor(1.0))
    assert torch.allclose(f, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    f = U.setup_filter([1, 3, 3, 1], separable=True, gain=4)
    assert f.shape == (4,) and torch.allclose(f.sum(), torch.tensor(2.0))    # gain^(1/2) per axis
    assert U.setup_filter(list(range(1, 9))).ndim == 1                      # long filters stay separable
    assert torch.equal(U.setup_filter([[1, 2], [3, 4]], normalize=False, flip_filter=True), torch.tensor([[4., 3], [2, 1]]))
    assert torch.equal(U.setup_filter(None), torch.ones(1, 1))
    with pytest.raises(ValueError, match='setup_filter'):
        U.setup_filter(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match='separable'):
        U.setup_filter([[1, 2], [3, 4]], separable=True)


def test_dtypes_and_identity():
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(U.upfirdn2d(x, None), x)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        y = U.upsample2d(x.to(dtype), U.setup_filter([1, 3, 3, 1]))
        assert y.dtype == dtype
        ref = U.upsample2d(x.double(), U.setup_filter([1, 3, 3, 1]))
        assert torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2)


def test_bad_input():
    with pytest.raises(ValueError, match='NCHW'):
        U.upfirdn2d(torch.zeros(2, 3, 4), None)
    with pytest.raises(ValueError, match='float32'):
        U.upfirdn2d(torch.zeros(1, 1, 4, 4), torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match='empty output'):
        U.upfirdn2d(torch.zeros(1, 1, 4, 4), None, padding=-2)
    with pytest.raises(ValueError, match='scaling'):
        U.upfirdn2d(torch.zeros(1, 1, 4, 4), None, up=0)


@pytest.mark.parametrize('up, down, padding, flip_filter, gain, taps, separable', TRANSPOSED_CASES)
def test_transposed_path_is_taken(monkeypatch, up, down, padding, flip_filter, gain, taps, separable):
    """upfirdn2d runs these cases as transposed convolutions (test_matches_direct_sum checks
    their values), and returns that path's output."""
    results = []
    transposed = U._upsample_transposed
    monkeypatch.setattr(U, '_upsample_transposed', lambda *args: results.append(transposed(*args)) or results[-1])
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    f = U.setup_filter(taps, normalize=False, separable=separable)
    y = U.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    assert len(results) == 1 and results[0] is y


def test_transposed_path_refuses_padding_it_cannot_express():
    x = torch.randn(1, 2, 5, 6)
    f = U.setup_filter([1, 3, 3, 1])
    assert U._upsample_transposed(x, f, (2, 2), (2, 1, 2, 1), False, 4.0) is not None
    # Output starting before the transposed convolution's first sample (p0 > taps - 1), or
    # ending past its last (p1 > taps - up), or output_padding >= up: the zero-inserted image.
    for padding in [(4, 1, 2, 1), (2, 3, 2, 1), (2, 1, 2, -2)]:
        assert U._upsample_transposed(x, f, (2, 2), padding, False, 4.0) is None
        expected = _upfirdn2d_loop(x.double().numpy(), f.double().numpy(), (2, 2), (1, 1), padding, False, 4.0)
        np.testing.assert_allclose(U.upfirdn2d(x, f, up=2, padding=padding, gain=4.0).numpy(), expected, rtol=1e-5, atol=1e-5)


GRAD_CASES = [
    (2, 1, [2, 2, 2, 2], True, 2.0, [1, -2, 3, 5], True),
    ((2, 3), 1, [2, 1, 2, 0], True, 1.0, [[1, 2], [5, 6], [1, 0], [2, -1]], False),
    (1, 1, 0, False, 1.0, [1, 2, 1], False),
    (2, 1, [2, 1, 2, 1], False, 4.0, [1, 3, 3, 1], False),
    (4, 1, [1, -2, 2, -1], True, 2.0, [[1, 0.5], [-2, 3]], False),
    (1, 2, [1, -1, 1, 1], True, 1.0, [1, 3, 3, 1], False),
    (1, 4, [-1, 2, 2, 1], False, 0.5, [[1, 2, 3], [4, 5, 6]], False),
    ((1, 2), (2, 1), [1, 2, -1, 1], False, 1.0, [1, 2, 3, 4, 5], True),
]


@pytest.mark.parametrize('up, down, padding, flip_filter, gain, taps, separable', GRAD_CASES)
def test_gradients(up, down, padding, flip_filter, gain, taps, separable):
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    f = U.setup_filter(taps, normalize=False, separable=separable).double().requires_grad_(True)
    # The reference takes float64 filters too (the public API insists on float32).
    fn = lambda x, f: U._upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain)
    assert torch.autograd.gradcheck(fn, (x, f))
    assert torch.autograd.gradgradcheck(fn, (x, f))
