"""Next3DLoss: schedules, blur, R1, logistic losses, pose-conditioning swap, style mixing, density regularization.

The networks here are small analytic stand-ins (test doubles) whose gradients and
densities are known in closed form, so each term can be checked against a hand value.
"""

import math

import numpy as np
import pytest
import torch

from torch_utils import training_stats
from training import loss as loss_lib
from training.dual_discriminator import filtered_resizing


class AnalyticG(torch.nn.Module):
    """Test double of a generator: ws = z repeated (+ c's mean); sigma = k . x at any point."""

    def __init__(self, z_dim=4, num_ws=6, c_dim=25, k=(0.0, 0.0, 1.0), box_warp=1.0):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, z_dim, num_ws
        self.k = torch.nn.Parameter(torch.tensor(k))
        self.scale = torch.nn.Parameter(torch.ones([]))
        self.rendering_kwargs = dict(box_warp=box_warp)
        self.mapping_calls = []
        self.sampled = []

    def mapping(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        self.mapping_calls.append(c.detach().clone())
        return z[:, None, :].repeat(1, self.num_ws, 1)

    def synthesis(self, ws, c, v=None, neural_rendering_resolution=None, update_emas=False, noise_mode='random'):
        r = neural_rendering_resolution
        img = torch.ones([ws.shape[0], 3, 8, 8]) * self.scale
        return dict(image=img, image_raw=torch.ones([ws.shape[0], 3, r, r]) * self.scale, image_depth=torch.zeros([ws.shape[0], 1, r, r]))

    def sample_mixed(self, coordinates, directions, ws, v=None, update_emas=False):
        self.sampled.append(coordinates.detach().clone())
        return dict(sigma=(coordinates @ self.k)[..., None], rgb=torch.zeros_like(coordinates))


class QuadraticD(torch.nn.Module):
    """Test double of D: logits = a x (sum image^2 + sum image_raw^2) + b."""

    def __init__(self, a=0.3, b=0.1):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))
        self.seen = []

    def forward(self, img, c, update_emas=False):
        self.seen.append({k: v.detach().clone() for k, v in img.items()})
        return (self.a * (img['image'].square().sum([1, 2, 3]) + img['image_raw'].square().sum([1, 2, 3])) + self.b)[:, None]


def make_loss(**kwargs):
    G, D = AnalyticG().requires_grad_(False), QuadraticD().requires_grad_(False)    # as the loop leaves them between phases
    defaults = dict(r1_gamma=2.0, neural_rendering_resolution_initial=4)
    defaults.update(kwargs)
    return loss_lib.Next3DLoss(torch.device('cpu'), G, D, **defaults), G, D


def batch(n=2, res=8):
    g = torch.Generator().manual_seed(3)
    real = torch.rand([n, 3, res, res], generator=g) * 2 - 1
    c = torch.randn([n, 25], generator=g)
    v = torch.randn([n, 20, 3], generator=g)
    z = torch.randn([n, 4], generator=g)
    return real, c, v, z


def test_schedules_hand_values():
    assert loss_lib.blur_sigma_at(0, 10, 200) == 10
    assert loss_lib.blur_sigma_at(50_000, 10, 200) == pytest.approx(7.5)
    assert loss_lib.blur_sigma_at(300_000, 10, 200) == 0
    assert loss_lib.blur_sigma_at(5, 10, 0) == 0
    assert loss_lib.swapping_prob_at(0, 0.5, 1000) == 1
    assert loss_lib.swapping_prob_at(500_000, 0.5, 1000) == pytest.approx(0.75)
    assert loss_lib.swapping_prob_at(2_000_000, 0.5, 1000) == pytest.approx(0.5)
    assert loss_lib.swapping_prob_at(0, 0.5, 0) == 0.5
    assert loss_lib.swapping_prob_at(0, None, 1000) is None
    assert loss_lib.neural_rendering_resolution_at(0, 64, 128, 1000) == 64
    assert loss_lib.neural_rendering_resolution_at(250_000, 64, 128, 1000) == 80
    assert loss_lib.neural_rendering_resolution_at(5_000_000, 64, 128, 1000) == 128
    assert loss_lib.neural_rendering_resolution_at(10**6, 64, None) == 64


def test_gaussian_blur_matches_explicit_kernel():
    sigma = 1.3
    img = torch.zeros([1, 2, 15, 15], dtype=torch.float64)
    img[0, 0, 7, 7] = 1
    img[0, 1, 2, 3] = 2          # near the border: zero padding
    out = loss_lib.gaussian_blur(img, sigma)
    radius = int(np.floor(3 * sigma))
    x = np.arange(-radius, radius + 1)
    f = np.exp2(-(x / sigma) ** 2)
    f /= f.sum()
    k = np.outer(f, f)
    expected = np.zeros([2, 15, 15])
    expected[0, 7 - radius:7 + radius + 1, 7 - radius:7 + radius + 1] = k
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            y, xx = 2 + dy, 3 + dx
            if 0 <= y < 15 and 0 <= xx < 15:
                expected[1, y, xx] = 2 * k[dy + radius, dx + radius]
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-12)
    assert loss_lib.gaussian_blur(img, 0.2) is img      # radius 0: untouched


def test_r1_gradient_matches_closed_form():
    """R1 = gamma/2 (|dD/dx|^2 + |dD/dx_raw|^2) with D = a(|x|^2 + |x_raw|^2) + b -> 4 a^2 (...)."""
    loss, G, D = make_loss(r1_gamma=2.0)
    real, c, v, z = batch()
    D.requires_grad_(True)
    loss.accumulate_gradients('Dreg', real, c, v, z, c, v, gain=16, cur_nimg=10**9)
    raw = filtered_resizing(real, 4)
    sq = real.square().sum([1, 2, 3]) + raw.square().sum([1, 2, 3])
    a, gamma = 0.3, 2.0
    # loss = mean(gamma / 2 * 4 a^2 sq) * gain; d/da = mean(gamma * 4 a sq) * gain
    expected = (gamma * 4 * a * sq).mean() * 16
    torch.testing.assert_close(D.a.grad, expected.to(D.a.grad.dtype), rtol=1e-5, atol=1e-6)
    assert D.b.grad is None or float(D.b.grad) == 0
    # D saw the reals and their antialiased downsampling to the rendering resolution.
    torch.testing.assert_close(D.seen[-1]['image_raw'], raw)


def test_logistic_losses_hand_values():
    loss, G, D = make_loss(r1_gamma=0.0)
    D.a.data.fill_(0.01)
    real, c, v, z = batch()
    collector = training_stats.Collector(regex='Loss/.*')
    G.requires_grad_(True)
    loss.accumulate_gradients('Gmain', real, c, v, z, c, v, gain=1, cur_nimg=10**9)
    G.requires_grad_(False)
    # Fakes are all-ones images x scale: logits = a scale^2 (3*8*8 + 3*4*4) + b.
    fake_logit = 0.01 * (192 + 48) + 0.1
    # d mean softplus(-logit) / d scale = -sigmoid(-logit) x a x 2 x 240
    expected_grad = -torch.sigmoid(torch.tensor(-fake_logit)).item() * 0.01 * 2 * 240
    assert float(G.scale.grad) == pytest.approx(expected_grad, rel=1e-4)
    assert D.a.grad is None                     # G's phase leaves D's gradients alone
    D.requires_grad_(True)
    loss.accumulate_gradients('Dboth', real, c, v, z, c, v, gain=1, cur_nimg=10**9)
    collector.update()
    assert collector.mean('Loss/G/loss') == pytest.approx(math.log1p(math.exp(-fake_logit)), rel=1e-5)
    raw = filtered_resizing(real, 4)
    real_logits = 0.01 * (real.square().sum([1, 2, 3]) + raw.square().sum([1, 2, 3])) + 0.1
    expected_d = (torch.nn.functional.softplus(torch.tensor(fake_logit)) + torch.nn.functional.softplus(-real_logits)).mean()
    assert collector.mean('Loss/D/loss') == pytest.approx(float(expected_d), rel=1e-5)
    # d/db of mean(softplus(fake)) + mean(softplus(-real)) = sigmoid(fake) - mean(sigmoid(-real))
    expected_b = torch.sigmoid(torch.tensor(fake_logit)) - torch.sigmoid(-real_logits).mean()
    assert float(D.b.grad) == pytest.approx(float(expected_b), rel=1e-4)


def test_blur_applies_to_what_d_sees():
    loss, G, D = make_loss(blur_init_sigma=2, blur_fade_kimg=1)
    real, c, v, z = batch(res=16)
    D.requires_grad_(True)
    loss.accumulate_gradients('Dmain', real, c, v, z, c, v, gain=1, cur_nimg=500)   # sigma = 1
    seen_fake, seen_real = D.seen[-2], D.seen[-1]
    torch.testing.assert_close(seen_real['image'], loss_lib.gaussian_blur(real, 1.0))
    torch.testing.assert_close(seen_real['image_raw'], loss_lib.gaussian_blur(filtered_resizing(real, 4), 1.0))   # EG3D's blur_raw_target
    torch.testing.assert_close(seen_fake['image_raw'], torch.ones_like(seen_fake['image_raw']))                  # fakes' raw: not blurred
    torch.testing.assert_close(seen_fake['image'], loss_lib.gaussian_blur(torch.ones_like(seen_fake['image']), 1.0))


def test_pose_conditioning_swap_and_zeros():
    loss, G, _ = make_loss(gpc_reg_prob=0.5, gpc_reg_fade_kimg=1000)
    c = torch.arange(4 * 25, dtype=torch.float32).reshape(4, 25)
    loss.mapping(torch.randn(4, 4), c, swapping_prob=1.0)
    torch.testing.assert_close(G.mapping_calls[-1], torch.roll(c, 1, 0))
    loss.mapping(torch.randn(4, 4), c, swapping_prob=0.0)
    torch.testing.assert_close(G.mapping_calls[-1], c)
    loss.mapping(torch.randn(4, 4), c, swapping_prob=None)           # gen_pose_cond off: zeros
    assert not G.mapping_calls[-1].any()
    torch.manual_seed(0)
    n = 4000
    big_c = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 25)
    loss.mapping(torch.randn(n, 4), big_c, swapping_prob=0.75)
    swapped = (G.mapping_calls[-1][:, 0] != big_c[:, 0]).float().mean()
    assert abs(float(swapped) - 0.75) < 0.03


def test_style_mixing_cuts_ws():
    loss, G, _ = make_loss(style_mixing_prob=1.0)
    torch.manual_seed(1)
    z = torch.randn(3, 4)
    ws = loss.mapping(z, torch.zeros(3, 25), swapping_prob=None)
    first = (ws == z[:, None, :]).all(dim=2).all(dim=0)            # (num_ws,) bool
    cut = int(first.float().sum())
    assert 1 <= cut < G.num_ws
    assert first[:cut].all() and not first[cut:].any()


@pytest.mark.parametrize('k', [(0.0, 0.0, 2.0), (1.0, -2.0, 0.5)])
def test_density_regularization_l1(k):
    """sigma = k . x: |sigma(p) - sigma(p + e)| = |k . e|, e ~ N(0, s^2) -> E = |k| s sqrt(2/pi)."""
    torch.manual_seed(0)
    loss, G, _ = make_loss(density_reg=0.25, density_reg_p_dist=0.004)
    _, c, v, z = batch(n=8)
    expected = 0.25 * np.linalg.norm(k) * 0.004 * math.sqrt(2 / math.pi)
    G.k.data = torch.tensor(k)
    value = loss.density_regularization(z, c, v, swapping_prob=None)
    assert float(value) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize('reg_type', ['monotonic-detach', 'monotonic-fixed'])
def test_density_regularization_monotonic(reg_type):
    """sigma = a z: the point behind (z - box/256) has lower density by a box/256 -> 10 a box / 256."""
    torch.manual_seed(0)
    loss, G, _ = make_loss(density_reg=0.25, density_reg_p_dist=0.0, reg_type=reg_type)
    G.k.data = torch.tensor([0.0, 0.0, 3.0])
    G.requires_grad_(True)
    _, c, v, z = batch(n=2)
    value = loss.density_regularization(z, c, v, swapping_prob=None)
    assert float(value.detach()) == pytest.approx(10 * 3.0 / 256, rel=1e-4)
    value.backward()
    # d/dk_z of 10 mean(sigma_front - sigma_behind) = 10 mean(z_front - z_behind) = 10 / 256 ('fixed');
    # with the front detached only -10 mean(z_behind) remains. (The L1 term is 0 with zero perturbation.)
    assert len(G.sampled) == 1                  # one query: G's planes are made once
    pts = G.sampled[0]
    assert pts.shape[1] == 2 * loss_lib.MONOTONIC_POINTS + 2 * loss_lib.DENSITY_REG_POINTS
    behind_z = pts[:, loss_lib.MONOTONIC_POINTS:2 * loss_lib.MONOTONIC_POINTS, 2]
    expected = 10 / 256 if reg_type == 'monotonic-fixed' else float(-10 * behind_z.mean())
    assert float(G.k.grad[2]) == pytest.approx(expected, rel=1e-3)


def test_unknown_reg_type_is_refused():
    with pytest.raises(ValueError, match='reg_type'):
        make_loss(reg_type='total-variation')


# --- augmentation (ADA subset) on what D sees ----------------------------------------------------

from training.augment import BGC, AugmentPipe   # noqa: E402


def augment(x, seed=0, p=1.0, **strengths):
    pipe = AugmentPipe(**strengths)
    pipe.p.fill_(p)
    torch.manual_seed(seed)
    return pipe(x)


def test_augment_luma_constants_are_made_once_per_device():
    from training import augment
    vv, k = augment._luma('cpu')
    v = torch.ones(3) / 3 ** 0.5
    x = torch.randn(3)
    torch.testing.assert_close(vv, torch.outer(v, v), atol=0, rtol=0)
    torch.testing.assert_close(k @ x, torch.linalg.cross(v, x))
    assert augment._luma(torch.device('cpu'))[1] is k


def test_augment_p0_is_identity():
    x = torch.rand(3, 6, 8, 8) * 2 - 1
    assert torch.equal(augment(x, p=0.0, **BGC), x)


def test_augment_xflip_and_rotate90_are_exact_permutations():
    x = torch.rand(16, 3, 8, 8)
    out = augment(x, xflip=1)
    flips = 0
    for i in range(16):
        same = torch.allclose(out[i], x[i], atol=1e-5)
        flipped = torch.allclose(out[i], x[i].flip(-1), atol=1e-5)
        assert same or flipped
        flips += flipped
    assert 0 < flips < 16
    out = augment(x, seed=1, rotate90=1)
    for i in range(16):
        assert any(torch.allclose(out[i], torch.rot90(x[i], k, dims=(1, 2)), atol=1e-5) for k in range(4))


def test_augment_integer_translation_shifts_whole_pixels():
    x = torch.rand(8, 3, 16, 16)
    out = augment(x, xint=1, xint_max=0.125)
    for i in range(8):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.roll(x[i], (dy, dx), dims=(1, 2))
                if torch.allclose(out[i, :, 3:-3, 3:-3], shifted[:, 3:-3, 3:-3], atol=1e-5):
                    found = True
        assert found, i


def test_augment_colour_maps_on_grey_and_offsets():
    grey = torch.rand(8, 1, 4, 4).repeat(1, 3, 1, 1) * 2 - 1
    torch.testing.assert_close(augment(grey, saturation=1), grey, atol=1e-5, rtol=0)      # no chroma to scale
    torch.testing.assert_close(augment(grey, hue=1), grey, atol=1e-5, rtol=0)             # rotation about the grey axis
    flipped = augment(grey, lumaflip=1)
    for i in range(8):
        assert torch.allclose(flipped[i], grey[i], atol=1e-5) or torch.allclose(flipped[i], -grey[i], atol=1e-5)
    x = torch.rand(8, 3, 4, 4)
    diff = augment(x, brightness=1) - x
    assert torch.allclose(diff, diff[:, :1, :1, :1].expand_as(diff), atol=1e-6) and diff.abs().max() > 0
    ratio = augment(x, contrast=1) / x
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-4)


def test_augment_treats_the_dual_pair_identically_and_is_differentiable():
    half = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    out = augment(torch.cat([half, half], dim=1), **BGC)
    torch.testing.assert_close(out[:, :3], out[:, 3:])
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: augment(t, seed=3, **BGC), (x,), eps=1e-6, atol=1e-5)


def test_ada_heuristic_moves_p_towards_the_target():
    from training.training_loop import adjust_augment
    import dnnlib
    pipe = AugmentPipe(**BGC)
    state = dnnlib.EasyDict(batch_idx=4, ada_collector=training_stats.Collector(regex='Loss/signs/real'),
                            ada_signs=torch.zeros(3, dtype=torch.float64))     # as the loop sets them up
    training_stats.report('Loss/signs/real', torch.ones(8))          # D is sure about the reals: overfitting
    adjust_augment(pipe, state, ada_target=0.6, ada_interval=4, ada_kimg=500, batch_size=32)
    assert float(pipe.p) == pytest.approx(32 * 4 / 500_000)
    training_stats.report('Loss/signs/real', -torch.ones(8))
    adjust_augment(pipe, state, ada_target=0.6, ada_interval=4, ada_kimg=500, batch_size=32)
    assert float(pipe.p) == 0
    state.batch_idx = 5                                              # not an adjustment step
    training_stats.report('Loss/signs/real', torch.ones(8))
    adjust_augment(pipe, state, ada_target=0.6, ada_interval=4, ada_kimg=500, batch_size=32)
    assert float(pipe.p) == 0
