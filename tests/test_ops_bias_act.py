"""bias_act reference: closed forms per activation, defaults, clamp, gradients."""

import math

import numpy as np
import pytest
import torch

from torch_utils.ops import bias_act as B


SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717

CLOSED_FORMS = {
    'linear':   lambda z, a: z,
    'relu':     lambda z, a: np.maximum(z, 0),
    'lrelu':    lambda z, a: np.where(z > 0, z, a * z),
    'tanh':     lambda z, a: np.tanh(z),
    'sigmoid':  lambda z, a: 1 / (1 + np.exp(-z)),
    'elu':      lambda z, a: np.where(z > 0, z, a * (np.exp(z) - 1)),
    'selu':     lambda z, a: SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * (np.exp(z) - 1)),
    'softplus': lambda z, a: np.log1p(np.exp(z)),
    'swish':    lambda z, a: z / (1 + np.exp(-z)),
}
DEFAULT_GAIN = {'relu': math.sqrt(2), 'lrelu': math.sqrt(2), 'swish': math.sqrt(2)}
DEFAULT_ALPHA = {'lrelu': 0.2, 'elu': 1.0}


@pytest.mark.parametrize('act', sorted(CLOSED_FORMS))
def test_closed_forms_with_defaults(act):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2
    b = torch.randn(3, dtype=torch.float64)
    y = B.bias_act(x, b, act=act)
    z = x.numpy() + b.numpy()[None, :, None, None]
    expected = CLOSED_FORMS[act](z, DEFAULT_ALPHA.get(act, 0.0)) * DEFAULT_GAIN.get(act, 1.0)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('act', sorted(CLOSED_FORMS))
def test_alpha_gain_clamp_dim(act):
    x = torch.randn(4, 6, 3, dtype=torch.float64) * 3
    b = torch.randn(3, dtype=torch.float64)
    y = B.bias_act(x, b, dim=-1, act=act, alpha=0.3, gain=1.7, clamp=0.9)
    z = x.numpy() + b.numpy()
    expected = np.clip(CLOSED_FORMS[act](z, 0.3) * 1.7, -0.9, 0.9)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert (y.abs() <= 0.9).all() and (y.abs() == 0.9).any()



@pytest.mark.parametrize('act', ['linear', 'relu', 'lrelu'])
@pytest.mark.parametrize('gain', [-1.5, 0.0, 0.5])
def test_gain_outside_the_activation_when_it_does_not_commute(act, gain):
    """act(x + b) * gain: the activations that commute with a positive gain scale before the
    activation (commutes_with_gain); a negative or zero gain must scale after it."""
    x = torch.randn(3, 4, 5, dtype=torch.float64) * 2
    b = torch.randn(4, dtype=torch.float64)
    y = B.bias_act(x, b, act=act, alpha=0.3, gain=gain)
    expected = CLOSED_FORMS[act](x.numpy() + b.numpy()[None, :, None], 0.3) * gain
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert B.commutes_with_gain(act, gain) == (gain > 0)
    assert not B.commutes_with_gain('tanh', 2.0)

def test_hand_values():
    x = torch.tensor([[-1.0, 2.0]])
    assert torch.allclose(B.bias_act(x, act='lrelu'), torch.tensor([[-0.2, 2.0]]) * math.sqrt(2))
    assert torch.allclose(B.bias_act(x, torch.tensor([1.0, -3.0]), act='relu', gain=1), torch.tensor([[0.0, 0.0]]))
    assert torch.allclose(B.bias_act(x, torch.tensor([0.5]), dim=0, clamp=1.0), torch.tensor([[-0.5, 1.0]]))
    assert torch.equal(B.bias_act(x), x)        # linear, no bias, gain 1: identity


def test_input_left_unchanged():
    # relu and lrelu run in place on a temporary: never on the caller's tensor.
    x = torch.randn(2, 3, 4)
    saved = x.clone()
    for act, gain, b in (('lrelu', 1, None), ('relu', 1, None), ('lrelu', 2.0, None), ('lrelu', None, torch.randn(3))):
        y = B.bias_act(x, b, act=act, gain=gain)
        assert torch.equal(x, saved) and y.data_ptr() != x.data_ptr()


def test_dtypes_and_memory_format():
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    b = torch.randn(4)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        y = B.bias_act(x.to(dtype), b, act='lrelu', clamp=1.0)
        assert y.dtype == dtype
        assert y.is_contiguous(memory_format=torch.channels_last)
        ref = B.bias_act(x.double(), b.double(), act='lrelu', clamp=1.0)
        assert torch.allclose(y.double(), ref, rtol=1e-2, atol=1e-2)


def test_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match='unknown activation'):
        B.bias_act(x, act='gelu')
    with pytest.raises(ValueError, match=r'b must have shape \[3\]'):
        B.bias_act(x, torch.zeros(2))
    with pytest.raises(ValueError, match='dim=2'):
        B.bias_act(x, dim=2)
    with pytest.raises(ValueError, match='clamp'):
        B.bias_act(x, clamp=-1)
    with pytest.raises(ValueError, match='floating-point'):
        B.bias_act(torch.zeros(2, 3, dtype=torch.int64))


def test_shape_checks_on_empty_input():
    # An empty batch must not hide a wrong bias: the same error with and without elements.
    for x in (torch.zeros(2, 5, 3), torch.zeros(0, 5, 3)):
        for impl in (None, 'ref'):
            with pytest.raises(ValueError, match=r'^bias_act: b must have shape \[5\] \(x.shape\[1\]\), got \(4,\)$'):
                B.bias_act(x, torch.zeros(4), impl=impl)


@pytest.mark.parametrize('act', sorted(CLOSED_FORMS))
@pytest.mark.parametrize('clamp', [None, 0.7])
def test_gradients(act, clamp):
    # Keep x + b away from the kinks of relu/lrelu/elu/clamp so finite differences are valid.
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x = (x.sign() * (x.abs() + 0.05)).requires_grad_(True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: B.bias_act(x, b, act=act, alpha=0.25, gain=1.3, clamp=clamp)
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


@pytest.mark.parametrize('act', ['relu', 'lrelu'])
def test_gradient_at_the_kink_takes_pytorchs_side(act):
    # At x + b == 0 exactly the op (the kernel, and its CPU twin here) takes the side of
    # PyTorch's own relu / leaky_relu: act'(0) = 0, resp. alpha. The GPU tests keep their
    # inputs off the kink, where the fused reference's rounding picks a side at random.
    b = torch.tensor([0.5, -1.25, 3.0], dtype=torch.float64)
    x = -b.reshape(1, 3).repeat(2, 1)
    dy = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, -4.0]], dtype=torch.float64)
    spec = B.ACTIVATIONS[act]
    got = B._bias_act_grad_op(dy, x, b, 1, act, spec.alpha, spec.gain, -1.0)
    xr = x.clone().requires_grad_(True)
    z = xr + b
    y = (torch.nn.functional.relu(z) if act == 'relu' else torch.nn.functional.leaky_relu(z, spec.alpha)) * spec.gain
    expected, = torch.autograd.grad(y, [xr], dy)
    assert torch.allclose(got, expected, rtol=1e-14, atol=0)        # (products in another order)
    assert torch.allclose(expected, dy * (0.0 if act == 'relu' else spec.alpha) * spec.gain, rtol=1e-14, atol=0)
