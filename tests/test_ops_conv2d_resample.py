"""conv2d_resample: the fused paths against the naive composition, hand values, gradients."""

import pytest
import torch
import torch.nn.functional as F

from torch_utils.ops import conv2d_resample as CR
from torch_utils.ops import upfirdn2d as U


def _naive(x, w, f, up, down, padding, groups, flip_weight, flip_filter):
    """StyleGAN2's definition: zero-insert + pad + FIR (gain up^2), valid conv, FIR + decimate."""
    fw, fh = U.get_filter_size(f)
    px0, px1, py0, py1 = U.parse_padding(padding)
    if up > 1:
        px0, px1, py0, py1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2, py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1, py0, py1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2, py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    x = U.upfirdn2d(x, f if up > 1 else None, up=up, padding=[px0, px1, py0, py1], gain=up ** 2, flip_filter=flip_filter, impl='ref')
    x = F.conv2d(x, w if flip_weight else w.flip([2, 3]), groups=groups)
    if down > 1:
        x = U.upfirdn2d(x, f, down=down, flip_filter=flip_filter, impl='ref')
    return x


CASES = [
    # kernel (kh, kw), up, down, padding, groups, flip_weight, flip_filter, filter taps
    ((3, 3), 1, 1, 1, 1, True, False, None),
    ((3, 3), 1, 1, [2, 0, 1, -1], 1, False, False, None),
    ((3, 3), 2, 1, 1, 1, True, False, [1, 3, 3, 1]),
    ((3, 3), 2, 1, 1, 2, False, True, [1, 2, 3, 4]),
    ((2, 3), 4, 1, [1, 0, 2, 1], 1, True, False, [1, 3, 3, 1]),
    ((3, 3), 2, 1, -1, 1, True, False, [[1, 2], [3, 5]]),
    ((3, 3), 1, 2, 1, 1, True, False, [1, 3, 3, 1]),
    ((3, 2), 1, 2, [0, 1, 1, 2], 2, False, True, [1, 2, 3, 4]),
    ((3, 3), 1, 4, 1, 1, True, False, [1, 3, 3, 1]),
    ((1, 1), 1, 1, 0, 1, True, False, None),
    ((1, 1), 1, 1, 0, 2, False, False, None),
    ((1, 1), 1, 1, 1, 1, True, False, None),
    ((1, 1), 2, 1, 0, 1, True, False, [1, 3, 3, 1]),
    ((1, 1), 1, 2, 0, 2, False, True, [1, 2, 3, 4]),
    ((3, 3), 2, 2, 1, 1, True, True, [1, 2, 3, 4]),
]


@pytest.mark.parametrize('kernel, up, down, padding, groups, flip_weight, flip_filter, taps', CASES)
def test_fused_matches_naive(kernel, up, down, padding, groups, flip_weight, flip_filter, taps):
    x = torch.randn(2, 4, 8, 9, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, *kernel, dtype=torch.float64)
    f = None if taps is None else U.setup_filter(taps)
    y = CR.conv2d_resample(x, w, f, up=up, down=down, padding=padding, groups=groups, flip_weight=flip_weight, flip_filter=flip_filter)
    expected = _naive(x, w, f, up, down, padding, groups, flip_weight, flip_filter)
    assert y.shape == expected.shape
    assert torch.allclose(y, expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize('grad', [False, True])
@pytest.mark.parametrize('kernel, up, down, padding, groups, flip_weight, flip_filter, taps', CASES)
def test_cpu_runs_channels_last_with_the_same_values(kernel, up, down, padding, groups, flip_weight, flip_filter, taps, grad):
    """On the CPU the convolution runs channels last (oneDNN's layout), with autograd or
    without; the values are the NCHW composition's."""
    x = torch.randn(2, 4, 8, 9, requires_grad=grad)
    w = torch.randn(6, 4 // groups, *kernel)
    f = None if taps is None else U.setup_filter(taps)
    y = CR.conv2d_resample(x, w, f, up=up, down=down, padding=padding, groups=groups, flip_weight=flip_weight, flip_filter=flip_filter)
    expected = _naive(x.detach(), w, f, up, down, padding, groups, flip_weight, flip_filter)
    assert expected.is_contiguous()
    assert y.shape == expected.shape
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)
    if kernel != (1, 1) and up == 1 and down == 1:                  # the convolution is the last step
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.parametrize('down', [1, 2])
def test_cpu_1x1_product_gradients_to_second_order(monkeypatch, down):
    """A plain 1x1 convolution on the CPU (also after a downsampling filter, as in D's skip
    layers) is a matrix product of the channels-last pixels, and the first-order gradients
    of D's R1 are differentiated again: its values, its gradients and their gradients are
    the convolution's (finite differences). Grouped or padded 1x1 kernels stay torch's."""
    calls = []
    product = CR._conv1x1_cpu
    monkeypatch.setattr(CR, '_conv1x1_cpu', lambda *a: calls.append(1) or product(*a))
    f = U.setup_filter([1, 3, 3, 1]) if down > 1 else None
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    y = CR.conv2d_resample(x, w, f, down=down)
    assert calls == [1] and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _naive(x, w, f, 1, down, 0, 1, True, False), rtol=1e-12, atol=1e-12)
    fn = lambda x, w: CR.conv2d_resample(x, w, f, down=down)
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))
    calls.clear()
    CR.conv2d_resample(torch.randn(1, 4, 5, 5), torch.randn(6, 2, 1, 1), groups=2)
    CR.conv2d_resample(torch.randn(1, 4, 5, 5), torch.randn(6, 4, 1, 1), padding=1)
    assert calls == []


def test_output_sizes():
    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(3, 2, 3, 3)
    f = U.setup_filter([1, 3, 3, 1])
    assert CR.conv2d_resample(x, w, f, up=2, padding=1).shape == (1, 3, 16, 16)
    assert CR.conv2d_resample(x, w, f, down=2, padding=1).shape == (1, 3, 4, 4)
    assert CR.conv2d_resample(x, w, padding=1).shape == (1, 3, 8, 8)


def test_hand_values():
    # A 1x1 kernel of 2 on a constant 1 image, upsampled with a normalized filter: 2 inside.
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    w = torch.full([1, 1, 1, 1], 2.0, dtype=torch.float64)
    y = CR.conv2d_resample(x, w, U.setup_filter([1, 3, 3, 1]), up=2)
    assert torch.allclose(y[:, :, 2:-2, 2:-2], torch.full([1, 1, 4, 4], 2.0, dtype=torch.float64))
    # flip_weight=False is a true convolution: an impulse reproduces the kernel as is.
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1
    w = torch.arange(9.0).reshape(1, 1, 3, 3)
    assert torch.equal(CR.conv2d_resample(x, w, padding=1, flip_weight=False)[0, 0], w[0, 0])
    assert torch.equal(CR.conv2d_resample(x, w, padding=1, flip_weight=True)[0, 0], w[0, 0].flip([0, 1]))


def test_bad_input():
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match='groups'):
        CR.conv2d_resample(x, torch.zeros(3, 4, 3, 3), groups=2)
    with pytest.raises(ValueError, match='dtype'):
        CR.conv2d_resample(x, torch.zeros(3, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match='integers'):
        CR.conv2d_resample(x, torch.zeros(3, 4, 3, 3), up=0)


GRAD_CASES = [
    ((3, 3), 2, 1, 1, 1, True, False, [1, 3, 3, 1]),
    ((3, 3), 1, 2, 1, 2, False, True, [1, 2, 3, 4]),
    ((2, 3), 4, 1, [1, 0, 2, 1], 1, True, False, [1, 3, 1]),
    ((3, 3), 1, 4, [2, 1, 1, 2], 1, True, False, [1, 3, 3, 1]),
    ((3, 3), 1, 1, [1, -1, 0, 2], 1, True, False, None),
]


@pytest.mark.parametrize('kernel, up, down, padding, groups, flip_weight, flip_filter, taps', GRAD_CASES)
def test_gradients(kernel, up, down, padding, groups, flip_weight, flip_filter, taps):
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2 // groups, *kernel, dtype=torch.float64, requires_grad=True)
    f = None if taps is None else U.setup_filter(taps)
    fn = lambda x, w: CR.conv2d_resample(x, w, f, up=up, down=down, padding=padding, groups=groups, flip_weight=flip_weight, flip_filter=flip_filter)
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))
