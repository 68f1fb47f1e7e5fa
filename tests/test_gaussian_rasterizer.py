"""The plain-PyTorch Gaussian rasterizer: projection, tiles vs the brute-force reference,
hand-computed composites, gradients (float64 gradcheck), density queries, gsplat parity."""

import math

import pytest
import torch

from training import coords
from training import gaussian_rasterizer as gr
from training.mesh.rasterize import project_perspective


def _scene(batch=2, n=60, channels=4, dtype=torch.float32, spread=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    cam = coords.cam2world_look_at(torch.tensor([1.4, 1.7])[:batch], torch.tensor([1.5, 1.6])[:batch])
    intr = torch.tensor([[4.26, 0.05, 0.48], [0, 4.1, 0.53], [0, 0, 1]])     # skew and an off-centre principal point
    c = coords.make_label(cam, intr).to(dtype)
    means = (torch.randn(batch, n, 3, generator=g) * spread + torch.tensor([0, 0, 0.2])).to(dtype)
    scales = (torch.rand(batch, n, 3, generator=g) * 0.03 + 0.005).to(dtype)
    quats = torch.randn(batch, n, 4, generator=g).to(dtype)
    opacities = (torch.rand(batch, n, generator=g) * 0.9 + 0.05).to(dtype)
    features = torch.rand(batch, n, channels, generator=g).to(dtype)
    background = torch.rand(batch, channels, generator=g).to(dtype)
    return dict(means=means, scales=scales, quats=quats, opacities=opacities, features=features, c=c, background=background)


def _render(fn, s, size, **kwargs):
    cov = gr.covariance_from_scale_rotation(s['scales'], s['quats'])
    return fn(s['means'], cov, s['opacities'], s['features'], s['c'], size, s['background'], **kwargs)


def _assert_same(a, b, atol):
    for name, x, y in zip(gr.Rendered._fields, a, b):
        assert x.shape == y.shape, name
        assert (x - y).abs().max() <= atol, f'{name}: {(x - y).abs().max()}'


def test_covariance_and_quaternion():
    q = torch.tensor([math.cos(math.pi / 8), 0, 0, math.sin(math.pi / 8)]) * 3      # 45 deg about z, not unit
    rot = gr.quaternion_to_matrix(q)
    s = math.sqrt(0.5)
    assert torch.allclose(rot, torch.tensor([[s, -s, 0], [s, s, 0], [0, 0, 1.0]]), atol=1e-6)
    cov = gr.covariance_from_scale_rotation(torch.tensor([2.0, 1.0, 0.5]), q)
    # x axis scaled 2 turned to (s, s): variance 4 along it, 1 across, 0.25 along z.
    assert torch.allclose(cov, torch.tensor([[2.5, 1.5, 0], [1.5, 2.5, 0], [0, 0, 0.25]]), atol=1e-5)


def test_projection_matches_perspective_and_numerical_jacobian():
    s = _scene(batch=2, n=5, dtype=torch.float64)
    h, w = 48, 40
    cov = gr.covariance_from_scale_rotation(s['scales'], s['quats'])
    proj = gr.project_gaussians(s['means'], cov, s['opacities'], s['c'], h, w)
    ndc = project_perspective(s['means'], s['c'])
    expected = torch.stack([(ndc[..., 0] + 1) / 2 * w, (ndc[..., 1] + 1) / 2 * h], dim=-1)
    assert torch.allclose(proj.means2d, expected, atol=1e-9)
    assert torch.allclose(proj.depths, ndc[..., 2], atol=1e-12)
    for b in range(2):
        for i in range(5):
            def pixel(p, b=b):
                q = project_perspective(p.view(1, 1, 3), s['c'][b:b + 1])[0, 0]
                return torch.stack([(q[0] + 1) / 2 * w, (q[1] + 1) / 2 * h])
            jac = torch.autograd.functional.jacobian(pixel, s['means'][b, i])
            cov2d = jac @ cov[b, i] @ jac.T + gr.EPS2D * torch.eye(2, dtype=torch.float64)
            a, bb, cc = proj.conics[b, i]
            assert torch.allclose(torch.linalg.inv(cov2d), torch.tensor([[a, bb], [bb, cc]], dtype=torch.float64), rtol=1e-9)
            # Footprint radius: alpha = ALPHA_MIN on the ellipse's major axis end.
            lam = torch.linalg.eigvalsh(cov2d)[-1]
            assert proj.radii[b, i] == pytest.approx(math.sqrt(2 * math.log(s['opacities'][b, i] * 255) * lam), rel=1e-9)


@pytest.mark.parametrize('size', [(40, 37), (16, 16), (33, 64)])
@pytest.mark.parametrize('scale', [1, 4])
@pytest.mark.parametrize('tile, chunk', [(8, 32), (16, 3)])
def test_tiles_equal_bruteforce(monkeypatch, size, scale, tile, chunk):
    """Any tile size, and tile lists taken `chunk` Gaussians at a time (the shorter lists
    dropping out of later chunks), give the brute-force result."""
    monkeypatch.setattr(gr, '_GAUSSIANS_PER_CHUNK', chunk)
    s = _scene()
    s['scales'] = s['scales'] * scale           # footprints from under a pixel to several tiles
    _assert_same(_render(gr.rasterize_gaussians, s, size, backend='pytorch', tile_size=tile),
                 _render(gr.render_gaussians_bruteforce, s, size), atol=2e-6)


def _frontal_camera():
    cam = coords.cam2world_look_at(torch.tensor([math.pi / 2]), torch.tensor([math.pi / 2]), radius=2.0, pivot=(0, 0, 0))
    return coords.make_label(cam, coords.intrinsics(2.0, 0.5, 0.5))      # at z = +2, looking down -z


@pytest.mark.parametrize('chunk', [None, 1])
def test_compositing_stops_for_good_at_transmittance_threshold(monkeypatch, chunk):
    """Three Gaussians on one line of sight, front to back opacities 0.995, 0.995, 0.3: the second
    would bring T to 2.5e-5 < 1e-4, so compositing stops before it, and the third (which would
    leave T = 0.0035) must not resume it, also when the tile lists are processed one Gaussian
    at a time (the stop carried from chunk to chunk)."""
    if chunk is not None:
        monkeypatch.setattr(gr, '_GAUSSIANS_PER_CHUNK', chunk)
    means = torch.tensor([[[0.0, 0.0, 0.5], [0.0, 0.0, 0.4], [0.0, 0.0, 0.3]]])
    cov = torch.eye(3).expand(1, 3, 3, 3) * 0.2 ** 2
    opac = torch.tensor([[0.995, 0.995, 0.3]])
    feats = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    out = gr.rasterize_gaussians(means, cov, opac, feats, _frontal_camera(), 32, backend='pytorch')
    ref = gr.render_gaussians_bruteforce(means, cov, opac, feats, _frontal_camera(), 32)
    _assert_same(out, ref, atol=1e-6)
    a = out.alpha[0, 0, 15, 15].item()
    assert 0.99 < a < 1 - gr.TRANSMITTANCE_MIN
    assert out.features[0, :, 15, 15].tolist() == pytest.approx([a, 0, 0], abs=1e-6)


def test_hand_computed_composite():
    """Two isotropic Gaussians straight ahead of a frontal camera: the nearer composites first."""
    c = _frontal_camera()
    means = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    cov = torch.eye(3).expand(1, 2, 3, 3) * 0.05 ** 2
    opac = torch.tensor([[0.6, 0.5]])
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    bg = torch.tensor([[0.2, 0.3]])
    out = gr.rasterize_gaussians(means, cov, opac, feats, c, 32, bg, backend='pytorch')
    # The centre pixels (15, 15) .. (16, 16) sit 0.5 px off the image centre in x and y.
    def alpha(o, z):
        sigma_px = 0.05 * 2.0 * 32 / z                                   # focal (pixels) x sigma / depth
        var = sigma_px ** 2 + gr.EPS2D
        return o * math.exp(-0.5 * (0.5 ** 2 + 0.5 ** 2) / var)
    a_near, a_far = alpha(0.5, 1.0), alpha(0.6, 2.0)
    expected_f = [a_far * (1 - a_near) + (1 - a_near) * (1 - a_far) * 0.2, a_near + (1 - a_near) * (1 - a_far) * 0.3]
    assert out.features[0, :, 15, 15].tolist() == pytest.approx(expected_f, abs=1e-6)
    assert out.alpha[0, 0, 15, 15].item() == pytest.approx(1 - (1 - a_near) * (1 - a_far), abs=1e-6)
    assert out.depth[0, 0, 15, 15].item() == pytest.approx(a_near * 1.0 + (1 - a_near) * a_far * 2.0, abs=1e-6)
    assert out.alpha[0, 0, 0, 0].item() == 0 and out.features[0, :, 0, 0].tolist() == pytest.approx([0.2, 0.3])


def test_input_order_does_not_matter():
    s = _scene(batch=1, n=40)
    perm = torch.randperm(40)
    t = {k: (v[:, perm] if k in ('means', 'scales', 'quats', 'opacities', 'features') else v) for k, v in s.items()}
    _assert_same(_render(gr.rasterize_gaussians, s, 32), _render(gr.rasterize_gaussians, t, 32), atol=1e-6)


def test_behind_camera_and_offscreen_are_culled():
    s = _scene(batch=1, n=3)
    cam2world, _ = coords.split_label(s['c'])
    origin, forward = cam2world[0, :3, 3], cam2world[0, :3, 2]
    s['means'][0, 0] = origin - forward * 0.5                            # behind the camera
    s['means'][0, 1] = origin + forward * 2 + cam2world[0, :3, 0] * 5   # far off to the right
    s['means'][0, 2] = origin + forward * 2
    out = _render(gr.rasterize_gaussians, s, 32)
    only = {k: (v[:, 2:] if k in ('means', 'scales', 'quats', 'opacities', 'features') else v) for k, v in s.items()}
    _assert_same(out, _render(gr.rasterize_gaussians, only, 32), atol=1e-6)


def test_gradcheck_float64():
    s = _scene(batch=1, n=4, channels=2, dtype=torch.float64, spread=0.03)
    s['scales'] = s['scales'] * 2
    s['opacities'] = s['opacities'].clamp(0.1, 0.8)

    def fn(means, scales, quats, opacities, features, background):
        cov = gr.covariance_from_scale_rotation(scales, quats)
        out = gr.rasterize_gaussians(means, cov, opacities, features, s['c'], 10, background, backend='pytorch')
        return out.features, out.alpha, out.depth
    inputs = [s[k].clone().requires_grad_(True) for k in ('means', 'scales', 'quats', 'opacities', 'features', 'background')]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    # Every input gets a gradient that is not zero.
    out = fn(*inputs)
    sum(o.sum() for o in out).backward()
    for name, t in zip(('means', 'scales', 'quats', 'opacities', 'features', 'background'), inputs):
        assert t.grad.abs().sum() > 0, name


def test_errors():
    s = _scene(batch=1, n=2)
    with pytest.raises(ValueError, match='unknown Gaussian rasterizer backend'):
        _render(gr.rasterize_gaussians, s, 8, backend='cuda')
    with pytest.raises(ValueError, match="'gsplat' .* needs CUDA"):
        _render(gr.rasterize_gaussians, s, 8, backend='gsplat')
    with pytest.raises(ValueError, match='25 values'):
        gr.rasterize_gaussians(s['means'], torch.eye(3).expand(1, 2, 3, 3), s['opacities'], s['features'], s['c'][:, :16], 8)


def test_gaussian_density_matches_dense_sum():
    s = _scene(batch=2, n=50, channels=3)
    cov = gr.covariance_from_scale_rotation(s['scales'], s['quats'])
    axis = torch.linspace(-0.3, 0.3, 12)
    grid = torch.stack(torch.meshgrid(axis, axis, axis + 0.2, indexing='ij'), -1).reshape(1, -1, 3).expand(2, -1, -1)
    scattered = torch.rand(2, 1500, 3, generator=torch.Generator().manual_seed(1)) - torch.tensor([0.5, 0.5, 0.3])
    grid = torch.cat([grid, scattered], dim=1)                            # 3228 points: 13 blocks, sorted and back
    dens, feat = gr.gaussian_density(grid, s['means'], cov, s['opacities'], s['features'])
    d = grid[:, :, None] - s['means'][:, None]
    q = torch.einsum('bmni,bnij,bmnj->bmn', d, torch.linalg.inv(cov), d)
    contrib = s['opacities'][:, None] * torch.exp(-0.5 * q)                # every Gaussian at every point
    full = contrib.sum(-1)
    assert full.max() > 0.5
    # Only contributions below DENSITY_CUTOFF may be missing (those outside a Gaussian's box).
    missing = full - dens
    assert missing.min() > -1e-5
    assert (missing <= (contrib < gr.DENSITY_CUTOFF).sum(-1) * gr.DENSITY_CUTOFF + 1e-5).all()
    mean_feat = (contrib[..., None] * s['features'][:, None]).sum(2) / full.unsqueeze(-1)
    dense = full > 0.2
    assert torch.allclose(feat[dense], mean_feat[dense], atol=0.02)


def test_gsplat_glue_with_a_stand_in(monkeypatch):
    """The gsplat backend's argument plumbing, with a stand-in module that follows gsplat's
    documented `rasterization` API (world-to-camera viewmats, pixel Ks, covars, 'RGB+D'
    appending the accumulated depth as the last channel, alphas) and renders with our
    reference: it must give the pytorch backend's images."""
    import sys
    import types

    def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, eps2d, packed,
                      render_mode, rasterize_mode, covars):
        assert quats is None and scales is None and render_mode == 'RGB+D' and rasterize_mode == 'classic'
        cam2world = torch.linalg.inv(viewmats)
        intr = Ks / torch.tensor([width, height, 1.0])[:, None]
        c = coords.make_label(cam2world, intr)
        out = gr.render_gaussians_bruteforce(means[None], covars[None], opacities[None], colors[None], c, (height, width),
                                             eps2d=eps2d, near_plane=near_plane)
        rgbd = torch.cat([out.features, out.depth], dim=1).permute(0, 2, 3, 1)
        return rgbd, out.alpha.permute(0, 2, 3, 1), {}
    monkeypatch.setitem(sys.modules, 'gsplat', types.SimpleNamespace(rasterization=rasterization))
    s = _scene()
    cov = gr.covariance_from_scale_rotation(s['scales'], s['quats'])
    acc, trans = gr._rasterize_gsplat(s['means'], cov, s['opacities'], s['features'], s['c'], 30, 26, gr.EPS2D, gr.NEAR_PLANE)
    glued = gr._finish(acc, trans, 30, 26, s['background'])
    _assert_same(glued, _render(gr.rasterize_gaussians, s, (30, 26), backend='pytorch'), atol=1e-5)   # camera inverted twice
    assert gr.gsplat_available()


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device (what 'auto' looks at)."""
    @property
    def is_cuda(self):
        return True


def test_gsplat_is_opt_in(monkeypatch):
    """As the mesh rasterizer's optional backends: 'auto' is ours even on CUDA tensors with gsplat
    importable (gsplat has never run in this repository), unless NEXT3D_GAUSSIAN_RASTERIZER=gsplat;
    CPU tensors always use ours; another value is refused."""
    import sys
    import types
    calls = []

    def rasterization(*args, **kwargs):
        calls.append(1)
        raise RuntimeError('stand-in gsplat called')
    monkeypatch.setitem(sys.modules, 'gsplat', types.SimpleNamespace(rasterization=rasterization))
    monkeypatch.delenv(gr.BACKEND_ENV, raising=False)
    s = _scene(batch=1, n=20)
    on_gpu = dict(s, means=s['means'].as_subclass(_OnGpu))
    reference = _render(gr.rasterize_gaussians, s, 16, backend='pytorch')
    _assert_same(_render(gr.rasterize_gaussians, on_gpu, 16), reference, atol=0)
    assert not calls
    monkeypatch.setenv(gr.BACKEND_ENV, 'gsplat')
    _assert_same(_render(gr.rasterize_gaussians, s, 16), reference, atol=0)          # CPU tensors: ours
    with pytest.raises(RuntimeError, match='stand-in gsplat called'):
        _render(gr.rasterize_gaussians, on_gpu, 16)
    assert calls
    monkeypatch.setenv(gr.BACKEND_ENV, 'nvdiffrast')
    with pytest.raises(ValueError) as e:
        _render(gr.rasterize_gaussians, s, 16)
    assert str(e.value) == ("NEXT3D_GAUSSIAN_RASTERIZER='nvdiffrast' is not a Gaussian rasterizer backend "
                            "(expected pytorch or gsplat)")
    monkeypatch.setitem(sys.modules, 'gsplat', None)                                # not installed
    monkeypatch.setenv(gr.BACKEND_ENV, 'gsplat')
    with pytest.raises(ValueError) as e:
        _render(gr.rasterize_gaussians, on_gpu, 16)
    assert str(e.value) == "the 'gsplat' Gaussian rasterizer backend needs the gsplat package (pip install gsplat)"


@pytest.mark.gpu
@pytest.mark.skipif(not gr.gsplat_available(), reason='needs gsplat')
def test_gsplat_parity():
    s = {k: v.cuda() for k, v in _scene(batch=2, n=200, channels=5).items()}
    ref = _render(gr.rasterize_gaussians, s, (48, 40), backend='pytorch')
    out = _render(gr.rasterize_gaussians, s, (48, 40), backend='gsplat')
    # gsplat's footprint radius differs slightly from ours (3.33 sigma cap): contributions of
    # ALPHA_MIN size at the edge may differ.
    _assert_same(out, ref, atol=2e-2)
    assert (out.features - ref.features).abs().mean() < 1e-3
