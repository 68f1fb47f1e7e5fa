"""Parity with the official code: official EG3D / Next3D pickles must give the official outputs.

The fixtures in tests/fixtures/official were made by tests/fixtures/make_official_fixtures.py
with the official code itself (small models of the official classes, pickled as its
training loop pickles them, run on fixed inputs). Here the pickles are loaded through
legacy.load_network_pkl (no official code runs) and every stage of the forward pass is
compared with the official intermediate, one test per stage, each stage fed the official
inputs of that stage, so that a failure names the stage. fp32 on the CPU, 1e-4 max abs.

Sampling is made deterministic as in the fixture script: torch.rand returns 0.5 while the
renderer runs (the stratified jitter and the importance-sampling quantiles; the test checks
that these are the only two draws), the StyleGAN2 networks run with noise_mode='const'.
"""

import io
import lzma
import os

import numpy as np
import pytest
import torch

import legacy
from training import coords
from training import mouth

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'official')
TOL = 1e-4
PSI = 0.7                                    # the truncation the fixtures used (cutoff None)


def load(name):
    with lzma.open(os.path.join(FIXTURES, f'{name}.pkl.xz')) as f:
        net = legacy.load_network_pkl(io.BytesIO(f.read()))
    ref = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(FIXTURES, f'{name}.npz')).items()}
    return net, ref


@pytest.fixture(scope='module')
def inputs():
    return {k: torch.from_numpy(v) for k, v in np.load(os.path.join(FIXTURES, 'inputs.npz')).items()}


@pytest.fixture(scope='module')
def eg3d():
    return load('eg3d')


@pytest.fixture(scope='module')
def next3d():
    return load('next3d')


def check(stage, ours, official, tol=TOL):
    ours, official = ours.detach().float(), official.float()
    assert ours.shape == official.shape, f'{stage}: shape {tuple(ours.shape)}, official {tuple(official.shape)}'
    diff = float((ours - official).abs().max())
    assert diff <= tol, f'{stage}: max |ours - official| = {diff:.3g} (tolerance {tol:g})'


class HalfSampling:
    """torch.rand -> 0.5 (the fixture script's deterministic sampling); counts the draws."""

    def __init__(self, monkeypatch):
        self.calls = 0

        def rand(*size, generator=None, dtype=None, device=None, **kwargs):
            shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            self.calls += 1
            return torch.full(shape, 0.5, dtype=dtype or torch.float32, device=device)
        monkeypatch.setattr(torch, 'rand', rand)


@pytest.fixture
def half_sampling(monkeypatch):
    return HalfSampling(monkeypatch)


def render(G, planes, c, nrr, sampling):
    """Our renderer on given planes: feature image (N, C, r, r), depth (N, 1, r, r)."""
    cam2world, intrinsics = coords.split_label(c)
    origins, directions = G.ray_sampler(cam2world, intrinsics, nrr)
    before = sampling.calls
    features, depth, _ = G.renderer(planes, G.decoder, origins, directions, G.rendering_kwargs)
    assert sampling.calls - before == 2, 'the renderer drew random numbers other than its two torch.rand calls'
    n = len(c)
    return features.permute(0, 2, 1).reshape(n, -1, nrr, nrr), depth.permute(0, 2, 1).reshape(n, 1, nrr, nrr)


# --- EG3D ---------------------------------------------------------------------------------

def test_eg3d_stored_neural_rendering_resolution(eg3d):
    net, ref = eg3d
    # Stored as after EG3D's fade to the SR input resolution: twice img_resolution // 4.
    assert net.G_ema.neural_rendering_resolution == int(ref['neural_rendering_resolution']) == 32
    assert net.G_ema.img_resolution // 4 == 16


def test_eg3d_mapping(eg3d, inputs):
    net, ref = eg3d
    check('mapping ws', net.G_ema.mapping(inputs['z'], inputs['c'], truncation_psi=PSI), ref['ws'])


def test_eg3d_static_planes(eg3d):
    net, ref = eg3d
    check('static tri-plane', net.G_ema.make_planes(ref['ws'], None, noise_mode='const'), ref['planes_static'])


def test_eg3d_volume_rendering(eg3d, inputs, half_sampling):
    net, ref = eg3d
    features, depth = render(net.G_ema, ref['planes_static'], inputs['c'], int(ref['neural_rendering_resolution']), half_sampling)
    check('rendered feature image', features, ref['feature_image'])
    check('rendered depth', depth, ref['image_depth'])


def test_eg3d_superresolution(eg3d):
    net, ref = eg3d
    G, fi = net.G_ema, ref['feature_image']
    check('super-resolution', G.superresolution(fi[:, :3], fi, ref['ws'], noise_mode='none'), ref['image'])


def test_eg3d_end_to_end(eg3d, inputs, half_sampling):
    net, ref = eg3d
    out = net.G_ema(inputs['z'], inputs['c'], truncation_psi=PSI, noise_mode='const')
    check('image', out['image'], ref['image'])
    check('image_depth', out['image_depth'], ref['image_depth'])
    check('image_raw (rendered)', out['image_raw'], ref['feature_image'][:, :3])


def test_eg3d_official_image_raw_is_changed_in_place(eg3d):
    """The official SuperresolutionHybrid4X / 2X at its input resolution adds its first
    block's skip output into a view of the raw feature image (add_), so the official G
    returns image_raw = rendered raw + that skip output (and its D trained on it). Ours
    returns the rendered raw; this records the official behaviour."""
    _, ref = eg3d
    assert float((ref['image_raw'] - ref['feature_image'][:, :3]).abs().max()) > 0.1


def test_eg3d_discriminator(eg3d, inputs):
    net, ref = eg3d
    check('D logits', net.D({'image': ref['image'], 'image_raw': ref['image_raw']}, inputs['c']), ref['d_logits'])


# --- Next3D -------------------------------------------------------------------------------

def split(G, inputs):
    v = inputs['v']
    return v[:, :G.num_vertices], v[:, G.num_vertices:]


def test_next3d_stored_neural_rendering_resolution(next3d):
    net, ref = next3d
    assert net.G_ema.neural_rendering_resolution == int(ref['neural_rendering_resolution']) == 16


def test_next3d_mapping(next3d, inputs):
    net, ref = next3d
    check('mapping ws (all truncated)', net.G_ema.mapping(inputs['z'], inputs['c'], truncation_psi=PSI), ref['ws'])


def test_next3d_texture(next3d):
    net, ref = next3d
    G = net.G_ema
    texture = G.texture_backbone.synthesis(ref['ws'][:, G.num_backbone_ws:], noise_mode='const')
    check('neural texture', texture, ref['texture'])


@pytest.mark.parametrize('view', ['front', 'side', 'top'])
def test_next3d_rasterized_views(next3d, inputs, view):
    net, ref = next3d
    G = net.G_ema
    verts, _ = split(G, inputs)
    r = G.rasterizer(verts, ref['texture'])
    check(f'{view} render', r[view], ref[f'render_{view}'])
    check(f'{view} alpha', r[f'{view}_alpha'], ref[f'alpha_{view}'])


def official_box(ref):
    """Official [y0, y1, x0, x1] -> ours (x0, y0, side)."""
    b = ref['mouth_box']
    assert torch.equal(b[:, 1] - b[:, 0], b[:, 3] - b[:, 2])
    return torch.stack([b[:, 2], b[:, 0], b[:, 1] - b[:, 0]], dim=1)


def test_next3d_mouth_box(next3d, inputs):
    net, ref = next3d
    G = net.G_ema
    _, lms = split(G, inputs)
    box = mouth.mouth_box_from_landmarks(G.rasterizer.project_landmarks_front(lms), image_size=G.plane_resolution)
    assert torch.equal(box, official_box(ref)), f'mouth box {box.tolist()}, official {official_box(ref).tolist()}'


def test_next3d_mouth_crop(next3d):
    net, ref = next3d
    crop = mouth.crop_mouth(ref['render_front'], official_box(ref), out_size=net.G_ema.mouth_backbone.in_resolution)
    check('mouth crop', crop, ref['mouth_crop'])


def test_next3d_mouth_network(next3d):
    net, ref = next3d
    G = net.G_ema
    check('mouth StyleUNet', G.mouth_backbone(ref['mouth_crop'], ref['ws'][:, :G.num_backbone_ws], noise_mode='const'), ref['mouth_out'])


def test_next3d_mouth_paste(next3d):
    _, ref = next3d
    check('mouth paste', mouth.paste_mouth(ref['render_front'], ref['mouth_out'], official_box(ref)), ref['front_pasted'])


def test_next3d_neural_blending(next3d):
    net, ref = next3d
    G = net.G_ema
    check('neural blending', G.neural_blending(ref['front_pasted'], ref['ws'][:, :G.num_backbone_ws], noise_mode='const'),
          ref['front_blended'])


def test_next3d_static_planes(next3d):
    net, ref = next3d
    G = net.G_ema
    static = G.backbone.synthesis(ref['ws'][:, :G.num_backbone_ws], noise_mode='const')
    check('static tri-plane', static.view(ref['planes_static'].shape), ref['planes_static'])


def test_next3d_plane_blend(next3d):
    net, ref = next3d
    R = net.G_ema.rasterizer
    rendered = R.to_planes(ref['front_blended'], ref['render_side'], ref['render_top'])
    alpha = R.to_planes(ref['alpha_front'], ref['alpha_side'], ref['alpha_top'])
    check('blended tri-plane', rendered * alpha + ref['planes_static'] * (1 - alpha), ref['planes_blended'])


def test_next3d_planes_end_to_end(next3d, inputs):
    net, ref = next3d
    check('make_planes', net.G_ema.make_planes(ref['ws'], inputs['v'], noise_mode='const'), ref['planes_blended'])


def test_next3d_volume_rendering(next3d, inputs, half_sampling):
    net, ref = next3d
    features, depth = render(net.G_ema, ref['planes_blended'], inputs['c'], int(ref['neural_rendering_resolution']), half_sampling)
    check('rendered feature image', features, ref['feature_image'])
    check('rendered depth', depth, ref['image_depth'])


def test_next3d_superresolution(next3d):
    net, ref = next3d
    G, fi = net.G_ema, ref['feature_image']
    check('super-resolution', G.superresolution(fi[:, :3], fi, ref['ws'][:, :G.num_backbone_ws], noise_mode='none'), ref['image'])


def test_next3d_end_to_end(next3d, inputs, half_sampling):
    net, ref = next3d
    out = net.G_ema(inputs['z'], inputs['c'], inputs['v'], truncation_psi=PSI, noise_mode='const')
    check('image', out['image'], ref['image'])
    check('image_raw', out['image_raw'], ref['image_raw'])        # SR resizes 16 -> 32 first: no in-place change
    check('image_depth', out['image_depth'], ref['image_depth'])


def test_next3d_discriminator(next3d, inputs):
    net, ref = next3d
    check('D logits', net.D({'image': ref['image'], 'image_raw': ref['image_raw']}, inputs['c']), ref['d_logits'])
