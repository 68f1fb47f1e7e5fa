"""grid_sample: F.grid_sample (bilinear, align_corners=False) with a gradient to the images
that is itself differentiable, as R1 through the augmentation needs on any PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from torch_utils.ops.grid_sample import grid_sample

MODES = ['zeros', 'border', 'reflection']


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 6, 7, dtype=dtype, generator=g)
    theta = torch.tensor([[[0.8, 0.3, 0.2], [-0.25, 1.1, -0.1]], [[1.2, 0.0, 0.3], [0.1, 0.7, 0.15]]], dtype=dtype)
    grid = F.affine_grid(theta, [2, 3, 5, 4], align_corners=False)      # reaches outside [-1, 1]: padding matters
    return images, grid


@pytest.mark.parametrize('mode', MODES)
def test_values_and_gradient_are_torch_grid_samples(mode):
    images, grid = _inputs(torch.float32)
    ours_in, ref_in = images.clone().requires_grad_(), images.clone().requires_grad_()
    ours = grid_sample(ours_in, grid, mode)
    ref = F.grid_sample(ref_in, grid, mode='bilinear', padding_mode=mode, align_corners=False)
    assert torch.equal(ours, ref)
    weights = torch.randn_like(ref)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.equal(ours_in.grad, ref_in.grad)


@pytest.mark.parametrize('mode', MODES)
def test_gradient_of_the_gradient_against_finite_differences(mode):
    images, grid = _inputs()
    images.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: grid_sample(x, grid, mode), (images,))
    assert torch.autograd.gradgradcheck(lambda x: grid_sample(x, grid, mode), (images,))


def test_r1_style_penalty_reaches_the_weights():
    """|d/dx sum(w * A x)|^2 differentiated in w (what R1 does with D's weights): 2 A A^T w."""
    images, grid = _inputs()
    images.requires_grad_()
    w = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    grad_x, = torch.autograd.grad((grid_sample(images, grid, 'reflection') * w).sum(), images, create_graph=True)
    grad_x.square().sum().backward()
    # A as a matrix, column by column: the sampling of each unit image.
    eye = torch.eye(images[0].numel(), dtype=torch.float64).reshape(-1, 3, 6, 7)
    cols = [F.grid_sample(eye, grid[b:b + 1].expand(len(eye), -1, -1, -1), padding_mode='reflection', align_corners=False)
            for b in range(2)]
    a = [c.reshape(len(eye), -1).t() for c in cols]                                  # (3 5 4, 3 6 7) per sample
    expected = torch.stack([(2 * a[b] @ a[b].t() @ w[b].detach().reshape(-1)).reshape(3, 5, 4) for b in range(2)])
    torch.testing.assert_close(w.grad, expected, rtol=1e-10, atol=1e-12)


def test_bad_arguments_are_refused():
    images, grid = _inputs()
    with pytest.raises(ValueError, match='padding_mode'):
        grid_sample(images, grid, 'wrap')
    with pytest.raises(ValueError, match='must not require grad'):
        grid_sample(images, grid.requires_grad_(), 'zeros')


_TORCH_GRID_SAMPLE = F.grid_sample       # the real one, for the stand-in below once F.grid_sample is patched


class _FirstOrderGridSample(torch.autograd.Function):
    """F.grid_sample as PyTorch 2.4 and 2.11 have it: a backward with no derivative of its own."""

    @staticmethod
    def forward(ctx, images, grid, mode, padding_mode, align_corners):
        ctx.save_for_backward(images, grid)
        ctx.args = (padding_mode, align_corners)
        return _TORCH_GRID_SAMPLE(images, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        images, grid = ctx.saved_tensors
        padding_mode, align_corners = ctx.args
        grad, _ = torch.ops.aten.grid_sampler_2d_backward(grad_output, images, grid, 0, MODES.index(padding_mode), align_corners,
                                                          [True, False])
        return grad, None, None, None, None


def test_augmented_r1_on_a_torch_without_grid_samples_second_derivative(monkeypatch):
    """train.py --aug ada stopped at its first R1 step on PyTorch 2.4 and 2.11 ("derivative for
    aten::grid_sampler_2d_backward is not implemented"): simulated here on any PyTorch."""
    from training.augment import BGC, AugmentPipe
    monkeypatch.setattr(F, 'grid_sample', lambda images, grid, mode='bilinear', padding_mode='zeros', align_corners=None:
                        _FirstOrderGridSample.apply(images, grid, mode, padding_mode, align_corners))
    pipe = AugmentPipe(**BGC)
    pipe.p.fill_(1.0)
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def augmented(t):
        torch.manual_seed(3)
        return pipe(t)
    assert torch.autograd.gradgradcheck(augmented, (x,), eps=1e-6, atol=1e-5)
