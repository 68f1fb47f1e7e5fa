"""Next3D and EG3D generators on the tiny presets (CPU), driven by the bundled head model.

Runs single-threaded: on a busy two-core machine, multi-threaded small convolutions are
many times slower than one thread.
"""

import math

import numpy as np
import pytest
import torch

from torch_utils import persistence
from training import configs
from training import coords
from training.mesh import obj_io
from training.mesh.head_model import load_head_model
from training.next3d_generator import load_topology


@pytest.fixture(scope='module')
def head():
    return load_head_model()


def condition(head, jaw=0.0, batch=1):
    """[batch, V + 68, 3] mesh condition with the jaw opened by `jaw` radians."""
    with torch.no_grad():
        verts, lms = head(jaw_pose=torch.tensor([[jaw, 0.0, 0.0]]).repeat(batch, 1))
    return torch.cat([verts, lms], dim=1)


def uv_sphere(n_lat=8, n_lon=8, radius=0.09):
    """A small UV sphere (vertices, faces, uvs) with another topology than the head model."""
    v, vt = [], []
    for i in range(n_lat + 1):
        th = math.pi * i / n_lat
        for j in range(n_lon + 1):
            ph = 2 * math.pi * j / n_lon
            v.append([radius * math.sin(th) * math.sin(ph), radius * math.cos(th), radius * math.sin(th) * math.cos(ph)])
            vt.append([j / n_lon, 1 - i / n_lat])
    width = n_lon + 1
    f = []
    for i in range(n_lat):
        for j in range(n_lon):
            a, b, c, d = i * width + j, (i + 1) * width + j, (i + 1) * width + j + 1, i * width + j + 1
            f += [[a, b, c], [a, c, d]]
    return np.array(v, np.float32), np.array(f, np.int64), np.array(vt, np.float32)


def frontal_label(batch=1, yaw=math.pi / 2):
    cam = coords.cam2world_look_at(torch.full([batch], yaw), torch.full([batch], math.pi / 2))
    return coords.make_label(cam)


def tiny_next3d(rendering_kwargs=None, **overrides):
    torch.manual_seed(0)
    G = configs.make_generator('tiny64',
                               rendering_kwargs=dict(deterministic_sampling=True, **(rendering_kwargs or {})), **overrides)
    with torch.no_grad():       # non-zero noise strengths so that noise modes matter
        for name, p in G.named_parameters():
            if name.endswith('noise_strength'):
                p.fill_(0.1)
    return G


def test_next3d_forward_shapes_ranges_and_determinism(head):
    G = tiny_next3d().eval()
    z, c, v = torch.randn(2, 64), frontal_label(2, yaw=1.4), condition(head, batch=2)
    out = G(z, c, v, noise_mode='const')
    assert out['image'].shape == (2, 3, 64, 64) and out['image_raw'].shape == (2, 3, 32, 32)
    assert out['image_depth'].shape == (2, 1, 32, 32)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out.values())
    assert out['image_raw'].min() >= -1 and out['image_raw'].max() <= 1
    assert out['image_depth'].min() >= coords.RAY_START and out['image_depth'].max() <= coords.RAY_END
    again = G(z, c, v, noise_mode='const')
    for key in out:
        torch.testing.assert_close(again[key], out[key], rtol=0, atol=0)
    assert not torch.equal(G(z, c, v, noise_mode='random')['image'], out['image'])
    # A lower raw resolution for one call leaves the attribute alone.
    small = G(z, c, v, noise_mode='const', neural_rendering_resolution=16)
    assert small['image_raw'].shape == (2, 3, 16, 16) and small['image'].shape == (2, 3, 64, 64)
    assert G.neural_rendering_resolution == 32


@pytest.mark.parametrize('plane_layout', ['aligned', 'released'])
def test_next3d_planes_blend_in_place_without_a_graph(head, monkeypatch, plane_layout):
    """Without a graph to record, the rendered planes are blended into the static ones plane by
    plane (no stacked renders): the planes the recorded path makes."""
    G = tiny_next3d(plane_layout=plane_layout).eval()
    ws = G.mapping(torch.randn(2, 64), frontal_label(2))
    v = condition(head, jaw=0.2, batch=2)
    recorded = G.make_planes(ws, v, noise_mode='const')
    assert recorded.requires_grad
    lerps = []
    real_lerp = torch.lerp
    monkeypatch.setattr(torch, 'lerp', lambda *a, **k: lerps.append(a[0].ndim) or real_lerp(*a, **k))
    with torch.no_grad():
        blended = G.make_planes(ws, v, noise_mode='const')
    monkeypatch.undo()
    assert lerps == [4, 4, 4]                           # plane by plane, (B, C, H, W) each
    # (the networks' own CPU inference paths round differently from the recorded ones)
    torch.testing.assert_close(blended, recorded.detach(), rtol=1e-4, atol=1e-4)
    static = G.backbone.synthesis(ws[:, :G.num_backbone_ws], noise_mode='const').detach()
    assert not torch.equal(blended.reshape(static.shape), static)          # the renders changed something


def test_next3d_gradients_reach_every_part(head):
    G = tiny_next3d().train()
    out = G(torch.randn(2, 64), frontal_label(2), condition(head, batch=2), noise_mode='const')
    out['image'].square().mean().backward()
    for part in ['texture_backbone', 'backbone', 'mouth_backbone', 'neural_blending', 'decoder', 'superresolution']:
        grads = [p.grad for n, p in G.named_parameters() if n.startswith(part + '.') and p.grad is not None]
        assert grads and max(float(g.abs().max()) for g in grads) > 0, part
    # The mapping (through every ws) as well.
    assert G.backbone.mapping.fc0.weight.grad.abs().max() > 0


def test_next3d_networks_get_gradients_in_their_output_layout(head):
    # On the CPU the networks' convolutions run channels last. The gradients reaching the
    # outputs of the mouth net, the tri-plane backbone and the texture backbone must come back
    # channels last too: a contiguous one makes their last convolutions' backward 2-3x slower.
    G = tiny_next3d().train()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            image = output if torch.is_tensor(output) else output[-1]      # (x, img): the img path
            if image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous():
                image.register_hook(lambda g: seen.__setitem__(name, g.is_contiguous(memory_format=torch.channels_last)))
        return hook
    for name, net in (('mouth', G.mouth_backbone), ('backbone', G.backbone.synthesis), ('texture', G.texture_backbone.synthesis)):
        net.register_forward_hook(record(name))
    out = G(torch.randn(2, 64), frontal_label(2), condition(head, batch=2), noise_mode='const')
    out['image'].square().mean().backward()
    assert seen == {'mouth': True, 'backbone': True, 'texture': True}


def test_jaw_changes_mouth_region_far_more_than_corners(head):
    G = tiny_next3d().eval()
    z, c = torch.randn(1, 64), frontal_label()
    closed_v, open_v = condition(head, 0.0), condition(head, 0.3)
    with torch.no_grad():
        closed = G(z, c, closed_v, noise_mode='const')
        opened = G(z, c, open_v, noise_mode='const')

    # Image rectangle of the vertices that the jaw moves (frontal camera, pinhole projection).
    moving = (open_v[0] - closed_v[0]).norm(dim=1) > 1e-4
    world = coords.mesh_to_world(closed_v[0, moving])
    cam2world, intr = coords.split_label(c)
    cam = (torch.linalg.inv(cam2world[0]) @ torch.cat([world, torch.ones(len(world), 1)], 1).T).T[:, :3]
    uv = (intr[0] @ (cam / cam[:, 2:]).T).T[:, :2]
    for key in ['image', 'image_raw', 'image_depth']:
        res = closed[key].shape[-1]
        (c0, r0), (c1, r1) = (uv.amin(0) * res).floor().int().tolist(), (uv.amax(0) * res).ceil().int().tolist()
        diff = (opened[key] - closed[key]).abs().mean(1)[0]
        mouth = float(diff[r0:r1, c0:c1].mean())
        # The top corners: the bottom ones look through the neck, at the jaw's height, and a
        # tri-plane shares each side/top plane feature along the third axis, so the moving
        # jaw legitimately changes features all along those rows.
        k = res // 8
        corners = float(torch.cat([diff[:k, :k], diff[:k, -k:]]).mean())
        assert mouth > 1e-3 and mouth >= 10 * corners, (key, mouth, corners)


def test_generator_planes_put_the_mesh_features_where_the_renderer_samples_them(head, monkeypatch):
    # G's whole plane path (texture -> rasterizer -> to_planes -> alpha blend with the static
    # planes -> the renderer's plane sampling) keeps the geometric consistency that
    # tests/test_texture_planes.py checks for the rasterizer alone: with a texture holding
    # each texel's 3D point, the mouth/blending nets bypassed and static planes of -1, the
    # renderer reads a surface point's own coordinates from the front plane where the front
    # view sees it, and the static -1 from the side and top planes in front of the face. (The
    # side plane holds the sum of the two yaw views, and the top view sees little of the face
    # mask: those are checked view by view there.)
    from tests.test_texture_planes import position_texture, surface_samples
    from training.mesh.rasterize import rasterize
    from training.volumetric_rendering.renderer import sample_from_planes
    G = tiny_next3d().eval()
    v = condition(head, jaw=0.2)
    verts = v[0, :G.num_vertices]
    rast = G.rasterizer
    faces = rast.faces
    skin = ~(head.lbs_weights.argmax(1) >= 3)[faces].any(1)      # eyeball UVs overlap the lids' in the template
    tex = position_texture(verts, faces[skin], rast.uvcoords[rast.uvfaces[skin]].reshape(-1, 2), size=512)
    tex = torch.cat([tex, torch.zeros(1, G.plane_channels - 3, *tex.shape[-2:])], 1)
    static = -torch.ones(1, 3 * G.plane_channels, G.plane_resolution, G.plane_resolution)
    monkeypatch.setattr(G.texture_backbone.synthesis, 'forward', lambda ws, **kwargs: tex)
    monkeypatch.setattr(G.backbone.synthesis, 'forward', lambda ws, **kwargs: static)
    monkeypatch.setattr(G, 'refine_front', lambda front, landmarks, eg3d_ws, **kwargs: front)
    with torch.no_grad():
        planes = G.make_planes(G.mapping(torch.randn(1, 64), frontal_label()), v)
        r = rast(verts[None], tex)
        alpha = rast.to_planes(r['front_alpha'], r['side_alpha'], r['top_alpha'])
    pts, normals = surface_samples(verts, faces[skin], per_face=2)
    sample = lambda p, planes: sample_from_planes(planes, coords.mesh_to_world(p)[None], plane_axes=G.plane_axes)[0]
    feat, a = sample(pts, planes)[..., :3], sample(pts, alpha)[..., 0]        # (3, N, 3), (3, N)
    hi, pixel = 4 * G.plane_resolution, 0.4 / G.plane_resolution
    ndc_all, ndc_pts = rast.to_view_ndc(verts[None]), rast.to_view_ndc(pts[None])
    depth = rasterize(ndc_all[0], faces, hi).depth[0]               # front view (plane 0: (x, y))
    # Seen: on the nearest surface, where depth is continuous over +-1 plane pixel.
    win_max = torch.nn.functional.max_pool2d(depth[None, None], 9, 1, 4)[0, 0]
    win_min = -torch.nn.functional.max_pool2d(-depth[None, None], 9, 1, 4)[0, 0]
    col = ((ndc_pts[0, 0, :, 0] + 1) * hi / 2).long().clamp(0, hi - 1)
    row = ((ndc_pts[0, 0, :, 1] + 1) * hi / 2).long().clamp(0, hi - 1)
    seen = (win_max[row, col].isfinite() & (win_max[row, col] - win_min[row, col] < 4 / G.plane_resolution)
            & ((ndc_pts[0, 0, :, 2] - depth[row, col]).abs() < 2 / hi) & (a[0] > 0.999))
    assert seen.sum() > 500
    err = (feat[0][seen] - pts[seen]).abs().max(1).values
    assert err.quantile(0.98) < pixel, f'98th percentile error {float(err.quantile(0.98)) * 1000:.2f} mm'
    # Air 10 cm in front of the face: the front plane still holds the face (its features are
    # constant along z), the side and top planes hold the static planes.
    air = sample(pts[normals[:, 2] > 0.8] + torch.tensor([0.0, 0.0, 0.1]), planes)[..., :3]
    assert (air[0] != -1).all(-1).float().mean() > 0.9
    assert (air[1] == -1).all(-1).float().mean() > 0.95 and (air[2] == -1).all(-1).float().mean() > 0.95


def test_truncation_cutoff_none_truncates_every_ws(head):
    # As the official mapping: no cutoff truncates all ws (the 20 here, 28 at FFHQ); the
    # scripts' --trunc-cutoff=14 (the official default) truncates the backbone ws only.
    G = tiny_next3d()
    with torch.no_grad():
        G.backbone.mapping.w_avg.copy_(torch.randn(64))
    z, c = torch.randn(3, 64), frontal_label(3)
    ws = G.mapping(z, c)
    nb = G.num_backbone_ws
    assert ws.shape == (3, G.num_ws, 64) and nb == 10 and G.num_ws == 20
    w_avg = G.backbone.mapping.w_avg
    half = G.mapping(z, c, truncation_psi=0.5)
    torch.testing.assert_close(half, w_avg + 0.5 * (ws - w_avg))
    cut = G.mapping(z, c, truncation_psi=0, truncation_cutoff=nb)
    torch.testing.assert_close(cut[:, :nb], w_avg.expand(3, nb, 64), rtol=0, atol=0)
    torch.testing.assert_close(cut[:, nb:], ws[:, nb:], rtol=0, atol=0)
    eg3d = configs.make_generator('tiny64-eg3d')
    torch.testing.assert_close(eg3d.mapping(z, c, truncation_psi=0), eg3d.backbone.mapping.w_avg.expand(3, eg3d.num_ws, 64),
                               rtol=0, atol=0)


def test_generator_argument_makes_renders_reproducible(head):
    # Random depth sampling (deterministic_sampling off): a seeded torch.Generator gives the
    # same images every time, whatever the global generator did in between.
    G = tiny_next3d().eval()
    G.rendering_kwargs['deterministic_sampling'] = False
    z, c, v = torch.randn(1, 64), frontal_label(1, yaw=1.4), condition(head)
    with torch.no_grad():
        ws = G.mapping(z, c)
        first = G.synthesis(ws, c, v, noise_mode='const', generator=torch.Generator().manual_seed(4))
        torch.rand(100)
        again = G(z, c, v, noise_mode='const', generator=torch.Generator().manual_seed(4))
        other = G.synthesis(ws, c, v, noise_mode='const', generator=torch.Generator().manual_seed(5))
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first['image_raw'], other['image_raw'])


def test_camera_conditioning_options(head):
    G = tiny_next3d(rendering_kwargs=dict(c_gen_conditioning_zero=True))
    z, c = torch.randn(2, 64), frontal_label(2)
    torch.testing.assert_close(G.mapping(z, c), G.mapping(z, torch.randn(2, 25)), rtol=0, atol=0)
    G = tiny_next3d()
    assert not torch.allclose(G.mapping(z, c), G.mapping(z, torch.randn(2, 25)))
    # Extra label values (expression) are ignored by the mapping.
    torch.testing.assert_close(G.mapping(z, torch.cat([c, torch.randn(2, 50)], 1)), G.mapping(z, c), rtol=0, atol=0)


def test_sample_and_sample_mixed_agree(head):
    G = tiny_next3d().eval()
    z, c, v = torch.randn(1, 64), frontal_label(), condition(head)
    pts = torch.rand(1, 50, 3) - 0.5
    dirs = torch.nn.functional.normalize(torch.randn(1, 50, 3), dim=-1)
    a = G.sample(pts, dirs, z, c, v, noise_mode='const')
    b = G.sample_mixed(pts, dirs, G.mapping(z, c), v, noise_mode='const')
    assert a['sigma'].shape == (1, 50, 1) and a['rgb'].shape == (1, 50, 32)
    torch.testing.assert_close(a['sigma'], b['sigma'], rtol=0, atol=0)


def test_checkpoint_round_trip(head, tmp_path):
    G = tiny_next3d().eval()
    G.neural_rendering_resolution = 16
    path = str(tmp_path / 'net.pkl')
    persistence.save_checkpoint(path, dict(G=G))
    H = persistence.load_checkpoint(path)['G']
    assert type(H) is type(G) and H.neural_rendering_resolution == 16 and H.topology_loaded
    z, c, v = torch.randn(2, 64), frontal_label(2), condition(head, batch=2)
    with torch.no_grad():       # (G's parameters require grad, H's not: with a graph to record, the rounding differs)
        a, b = G(z, c, v, noise_mode='const'), H(z, c, v, noise_mode='const')
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    recorded = G(z, c, v, noise_mode='const')
    for key in a:
        torch.testing.assert_close(recorded[key].detach(), a[key], rtol=1e-4, atol=1e-4)


def test_eg3d_generator_tiny_and_round_trip(tmp_path):
    torch.manual_seed(0)
    G = configs.make_generator('tiny64-eg3d', rendering_kwargs=dict(deterministic_sampling=True)).eval()
    G.requires_grad_(False)         # as a loaded checkpoint's (with a graph to record, the rounding differs)
    z, c = torch.randn(2, 64), frontal_label(2)
    out = G(z, c, noise_mode='const')          # v is optional and ignored
    assert out['image'].shape == (2, 3, 64, 64) and out['image_depth'].shape == (2, 1, 32, 32)
    torch.testing.assert_close(G(z, c, torch.zeros(2, 7, 3), noise_mode='const')['image'], out['image'], rtol=0, atol=0)
    path = str(tmp_path / 'eg3d.pkl')
    persistence.save_checkpoint(path, dict(G_ema=G))
    H = persistence.load_checkpoint(path)['G_ema']
    torch.testing.assert_close(H(z, c, noise_mode='const')['image'], out['image'], rtol=0, atol=0)


def test_clear_errors(head, tmp_path):
    sizes = configs.template_sizes(configs.BUNDLED_TEMPLATE)
    G = configs.make_generator('tiny64', **sizes)      # sizes but no template: topology not loaded
    z, c = torch.randn(1, 64), frontal_label()
    with pytest.raises(RuntimeError, match='load_topology'):
        G(z, c, condition(head))
    load_topology(G, configs.BUNDLED_TEMPLATE, configs.BUNDLED_UV_MASK)
    with pytest.raises(ValueError, match='mesh condition'):
        G(z, c)
    with pytest.raises(AssertionError, match='68 landmarks'):
        G(z, c, condition(head)[:, :-1])
    other = str(tmp_path / 'other.obj')
    v, f, vt = uv_sphere()
    obj_io.write_obj(other, v, f, vt, f)
    with pytest.raises(ValueError, match='does not match'):
        load_topology(G, other)
    with pytest.raises(ValueError, match='unknown network preset'):
        configs.make_generator('ffhq1024')
    with pytest.raises(ValueError, match='unknown rendering_kwargs'):
        configs.make_generator('tiny64-eg3d', rendering_kwargs=dict(depth_res=3))


def test_compatibility_options_for_official_weights(head):
    """The released layout / side alpha / EG3D plane axes build and render, and differ from the fixed ones."""
    z, c, v = torch.randn(1, 64), frontal_label(), condition(head)
    fixed = tiny_next3d().eval()
    compat = tiny_next3d(plane_axes='eg3d', plane_layout='released', side_alpha='released').eval()
    assert compat.rasterizer.layout == 'released' and compat.renderer.plane_axes == 'eg3d'
    compat.load_state_dict(fixed.state_dict())      # same parameters, only the wiring differs
    with torch.no_grad():
        a, b = fixed(z, c, v, noise_mode='const'), compat(z, c, v, noise_mode='const')
    assert b['image'].shape == a['image'].shape and torch.isfinite(b['image']).all()
    assert not torch.allclose(a['image_raw'], b['image_raw'])
    with pytest.raises(ValueError, match='plane_axes'):
        tiny_next3d(plane_axes='xyz')
