"""filtered_lrelu reference: against upfirdn2d + bias + lrelu + clamp + upfirdn2d, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from torch_utils.ops import filtered_lrelu as FL
from torch_utils.ops import upfirdn2d as U


def _composition(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter):
    x = x + b[None, :, None, None]
    x = U.upfirdn2d(x, fu, up=up, padding=padding, gain=up ** 2, flip_filter=flip_filter, impl='ref')
    x = F.leaky_relu(x, slope) * gain
    if clamp is not None:
        x = torch.clamp(x, -clamp, clamp)
    return U.upfirdn2d(x, fd, down=down, flip_filter=flip_filter, impl='ref')


CASES = [
    # up, down, padding, clamp, flip_filter, fu taps, fd taps
    (1, 1, 0, None, False, None, None),
    (2, 2, [3, 2, 3, 2], None, False, [1, 3, 3, 1], [1, 3, 3, 1]),
    (2, 1, 2, 0.5, True, [1, 2, 4, 1], None),
    (1, 2, [0, 1, 1, 0], 1.0, False, None, [1, 2, 3, 4]),
    (4, 2, [5, 4, 6, 3], None, True, [1, 3, 6, 3, 2, 1, 1, 1], [1, 5, 1, 3]),
    (2, 4, [-1, 2, 1, 0], 0.3, False, [[1, 2], [3, 4]], [1, 2, 3, 4, 5, 6, 7, 8]),
]


@pytest.mark.parametrize('up, down, padding, clamp, flip_filter, fu_taps, fd_taps', CASES)
def test_matches_composition(up, down, padding, clamp, flip_filter, fu_taps, fd_taps):
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    fu = None if fu_taps is None else U.setup_filter(fu_taps)
    fd = None if fd_taps is None else U.setup_filter(fd_taps)
    y = FL.filtered_lrelu(x, fu, fd, b, up=up, down=down, padding=padding, gain=1.5, slope=0.1, clamp=clamp, flip_filter=flip_filter)
    expected = _composition(x, fu, fd, b, up, down, padding, 1.5, 0.1, clamp, flip_filter)
    assert y.shape == expected.shape
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_hand_values_no_filters():
    # up = down = 1 and no filters: pad(lrelu(x + b) * gain); the padded border is lrelu(0) = 0.
    x = torch.tensor([[[[-1.0, 2.0]]]])
    y = FL.filtered_lrelu(x, b=torch.tensor([0.5]), padding=[1, 0, 0, 1])
    s = math.sqrt(2)
    assert torch.allclose(y, torch.tensor([[[[0.0, -0.1 * s, 2.5 * s], [0.0, 0.0, 0.0]]]]))
    y = FL.filtered_lrelu(x, slope=0.5, gain=2, clamp=3)
    assert torch.allclose(y, torch.tensor([[[[-1.0, 3.0]]]]))


def test_defaults_and_dtypes():
    x = torch.randn(1, 2, 4, 4)
    y = FL.filtered_lrelu(x)
    assert torch.allclose(y, F.leaky_relu(x, 0.2) * math.sqrt(2))
    fu = U.setup_filter([1, 3, 3, 1])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        y = FL.filtered_lrelu(x.to(dtype), fu, fu, up=2, down=2, padding=3)
        assert y.dtype == dtype
        ref = FL.filtered_lrelu(x.double(), fu, fu, up=2, down=2, padding=3)
        assert torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2)


def test_bad_input():
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match='shape'):
        FL.filtered_lrelu(x, b=torch.zeros(3))
    with pytest.raises(ValueError, match='integers'):
        FL.filtered_lrelu(x, up=(2, 2))
    with pytest.raises(ValueError, match='clamp'):
        FL.filtered_lrelu(x, clamp=-1)
    with pytest.raises(ValueError, match='NCHW'):
        FL.filtered_lrelu(torch.zeros(2, 4, 4))


GRAD_CASES = [
    (1, 1, 1, None, False, None, None),
    (2, 2, [3, 2, 3, 2], 0.8, False, [1, 3, 3, 1], [1, 3, 3, 1]),
    (4, 1, [2, 1, -1, 2], None, True, [1, 2, 3, 1], None),
    (1, 4, [-1, 2, 2, 1], 0.5, True, None, [1, 2, 1]),
]


@pytest.mark.parametrize('up, down, padding, clamp, flip_filter, fu_taps, fd_taps', GRAD_CASES)
def test_gradients(up, down, padding, clamp, flip_filter, fu_taps, fd_taps):
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    x = (x.sign() * (x.abs() + 0.05)).requires_grad_(True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    fu = None if fu_taps is None else U.setup_filter(fu_taps)
    fd = None if fd_taps is None else U.setup_filter(fd_taps)
    fn = lambda x, b: FL.filtered_lrelu(x, fu, fd, b, up=up, down=down, padding=padding, gain=1.3, slope=0.3, clamp=clamp, flip_filter=flip_filter)
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
