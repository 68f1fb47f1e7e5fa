"""torch_utils/ops/conv2d_double_backward.py: the same values and derivatives (to second
order) as torch's own convolutions, and only inside twice_differentiable()."""

import types

import pytest
import torch
import torch.nn.functional as F

from torch_utils.ops import conv2d_double_backward as cdb

# (x shape, w shape, stride, padding, output_padding, groups, transposed, w requires grad)
CASES = [
    ((2, 3, 7, 6), (4, 3, 3, 3), 1, 1, 0, 1, False, True),
    ((2, 3, 9, 8), (4, 3, 3, 3), 2, 0, 0, 1, False, True),          # strided, odd size: output padding 1 in the adjoint
    ((2, 4, 6, 6), (6, 2, 3, 3), 1, 1, 0, 2, False, True),          # grouped
    ((2, 3, 5, 5), (2, 3, 1, 1), 1, 0, 0, 1, False, True),          # 1 x 1
    ((2, 3, 8, 8), (3, 1, 4, 4), 2, 1, 0, 3, False, False),         # a depthwise FIR filter (a constant)
    ((2, 3, 4, 5), (3, 2, 3, 3), 2, 0, 1, 1, True, True),           # transposed, output padding
    ((2, 4, 4, 4), (4, 1, 4, 4), 2, 1, 0, 4, True, False),          # depthwise transposed FIR upsampling
]


def _native(x, w, stride, padding, output_padding, groups, transposed):
    if transposed:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, output_padding=output_padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _ours(x, w, stride, padding, output_padding, groups, transposed):
    if transposed:
        return cdb.conv_transpose2d(x, w, stride=stride, padding=padding, output_padding=output_padding, groups=groups)
    return cdb.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _r1_like(conv, x, w, args, weight_out):
    """An R1-shaped objective: |d <conv(x, w), weight_out> / dx|^2 and its gradient for x and w."""
    y = conv(x, w, *args)
    dx, = torch.autograd.grad((y * weight_out).sum(), x, create_graph=True)
    penalty = dx.square().sum() + (dx * x).sum()
    wanted = [x, w] if w.requires_grad else [x]
    return [y, dx] + list(torch.autograd.grad(penalty, wanted))


@pytest.mark.parametrize('case', CASES, ids=[f'case{i}' for i in range(len(CASES))])
def test_values_and_second_derivatives_match_torch(case):
    x_shape, w_shape, *args, w_grad = case
    torch.manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, dtype=torch.float64, requires_grad=w_grad)
    y_shape = _native(x, w, *args).shape
    weight_out = torch.randn(y_shape, dtype=torch.float64)
    ref = _r1_like(_native, x, w, args, weight_out)
    with cdb.twice_differentiable():
        got = _r1_like(_ours, x, w, args, weight_out)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize('case', [CASES[1], CASES[2], CASES[5]], ids=['strided', 'grouped', 'transposed'])
def test_gradgradcheck(case):
    x_shape, w_shape, *args, _ = case
    torch.manual_seed(1)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        with cdb.twice_differentiable():
            return _ours(x, w, *args)
    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


def test_only_inside_the_context_and_with_gradients():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    assert type(cdb.conv2d(x, w, padding=1).grad_fn).__name__ == 'ConvolutionBackward0'
    with cdb.twice_differentiable():
        assert type(cdb.conv2d(x, w, padding=1).grad_fn).__name__ == '_ConvBackward'
        with torch.no_grad():
            assert cdb.conv2d(x, w, padding=1).grad_fn is None
        assert cdb.conv2d(x.detach(), w.detach(), padding=1).grad_fn is None
    assert cdb._active[0] == 0


def test_r1_double_backward_runs_no_image_sized_convolutions():
    """The point of it: the second derivative runs weight-gradient kernels, not forward
    convolutions with image-sized kernels (PyTorch's own double backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith('convolution.'):
                seen.append(tuple(args[1].shape))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    for ours in (False, True):
        seen.clear()
        with cdb.twice_differentiable() if ours else torch.enable_grad():
            y = cdb.conv2d(x, w, padding=1)
        dx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with Log():
            dx.square().sum().backward()
        big = [s for s in seen if s[-1] >= 16]
        assert bool(big) != ours, (ours, seen)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)])
def test_r1_of_the_dual_discriminator_matches_torch_double_backward(device):
    """tiny64's D with blur: R1's gradients for D's parameters, through
    Next3DLoss.run_D(double_backward=True), equal those of torch's own double backward
    (to float32 rounding: D's blocks compute in float32 whatever the parameters' dtype)."""
    from training import configs
    from training.loss import Next3DLoss, r1_penalty
    torch.manual_seed(0)
    D = configs.make_discriminator('tiny64').requires_grad_(True).to(device)
    loss = Next3DLoss(torch.device(device), G=types.SimpleNamespace(synthesis=None, sample_mixed=None), D=D, r1_gamma=1.0)
    image = torch.randn(2, 3, 64, 64, device=device, requires_grad=True)
    image_raw = torch.randn(2, 3, 32, 32, device=device, requires_grad=True)
    c = torch.randn(2, 25, device=device)
    grads = []
    for ours in (False, True):
        if ours:
            logits = loss.run_D(dict(image=image, image_raw=image_raw), c, blur_sigma=2.0, double_backward=True)
        else:
            logits = D(loss._prepare_D_input(dict(image=image, image_raw=image_raw), 2.0), c)
        penalty = r1_penalty(logits, [image, image_raw]).sum()
        grads.append(torch.autograd.grad(penalty, list(D.parameters()), allow_unused=True))
    for name, a, b in zip([n for n, _ in D.named_parameters()], *grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()), rtol=1e-4, msg=name)


def test_r1_first_derivative_computes_no_weight_gradients():
    """r1_penalty asks for the inputs' gradients only: no convolution's weight gradient is
    computed then (our convolutions cannot see that from autograd), while the second
    derivative still reaches the weights."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from training.loss import r1_penalty
    masks = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith('convolution_backward'):
                masks.append(tuple(args[-1]))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w1, w2 = torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(1, 4, 3, 3, requires_grad=True)
    with cdb.twice_differentiable():
        logits = cdb.conv2d(torch.nn.functional.leaky_relu(cdb.conv2d(x, w1, padding=1), 0.2), w2, stride=2).mean([1, 2, 3])
    with Log():
        penalty = r1_penalty(logits, [x]).sum()
    assert not any(m[1] for m in masks), masks
    with Log():                                   # (the log sees them where they are computed)
        torch.autograd.grad(logits.sum(), [w1], retain_graph=True)
    assert any(m[1] for m in masks)
    got = torch.autograd.grad(penalty, [w1, w2])
    ref_logits = torch.nn.functional.conv2d(torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(x, w1, padding=1), 0.2), w2, stride=2).mean([1, 2, 3])
    ref = torch.autograd.grad(r1_penalty(ref_logits, [x]).sum(), [w1, w2])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
