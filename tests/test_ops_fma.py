"""fma: a * b + c with broadcasting; gradients reduced to each input's shape."""

import torch

from torch_utils.ops.fma import fma


def test_values_and_broadcasting():
    a = torch.randn(2, 3, 1, 4, dtype=torch.float64)
    b = torch.randn(3, 5, 1, dtype=torch.float64)
    c = torch.randn(1, 4, dtype=torch.float64)
    y = fma(a, b, c)
    assert y.shape == (2, 3, 5, 4)
    assert torch.allclose(y, a * b + c, rtol=1e-14, atol=1e-14)
    assert torch.equal(fma(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(1.0)), torch.tensor(7.0))


def test_gradients_have_input_shapes():
    a = torch.randn(2, 3, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fma(a, b, c).sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape and c.grad.shape == c.shape
    assert torch.allclose(a.grad, b.detach().sum(2, keepdim=True).expand(2, 3, 1))
    assert torch.allclose(c.grad, torch.full([4], 6.0, dtype=torch.float64))
    assert torch.autograd.gradcheck(fma, (a, b, c))
    assert torch.autograd.gradgradcheck(fma, (a, b, c))
