"""GaussianGenerator: UV anchors on the posed mesh, face frames, the mouth pocket, the
interface shared with Next3DGenerator (outputs, ws, sample), checkpoints and errors."""

import math

import pytest
import torch

from torch_utils import persistence
from training import builders
from training import configs
from training import coords
from training import gaussian_generator as gg
from training import gaussian_rasterizer as gr
from training.mesh.head_model import load_head_model, load_template
from training.mesh.obj_io import read_obj_vertices


@pytest.fixture(scope='module')
def G():
    torch.manual_seed(0)
    return configs.make_generator('tiny64-gaussian').eval()


@pytest.fixture(scope='module')
def head():
    return load_head_model()


def _condition(head, jaw: float = 0.0, expression=None):
    verts, lms = head(jaw_pose=torch.tensor([[jaw, 0.0, 0.0]]), expression=expression)
    return torch.cat([verts, lms], dim=1)


def _frontal(batch=1, radius=coords.CAMERA_RADIUS, pivot=coords.CAMERA_PIVOT):
    cam = coords.cam2world_look_at(torch.full([batch], math.pi / 2), torch.full([batch], math.pi / 2), radius=radius, pivot=pivot)
    return coords.make_label(cam)


def test_texel_anchors_are_the_surface_points_under_the_texels(G, head):
    """Each texel's anchor is the point of its UV face at the texel centre, mapped onto the
    mesh: checked against barycentrics computed here from scratch, on a posed mesh."""
    faces, uvcoords, uvfaces = load_template(configs.BUNDLED_TEMPLATE)
    rast = G.rasterizer
    u = rast.uv_resolution
    valid = torch.nonzero(rast.texel_face >= 0).squeeze(1)
    assert len(valid) > 0.9 * u * u                          # the bundled layout fills the UV square
    v = _condition(head, jaw=0.2, expression=torch.randn(1, head.n_exp, generator=torch.Generator().manual_seed(1)) * 0.5)
    ws = G.mapping(torch.randn(1, G.z_dim), _frontal())
    G.gaussian_kwargs['offset_gain'] = 0.0                 # no offsets: the Gaussians sit on their anchors
    try:
        with torch.no_grad():
            means = G.make_gaussians(ws, v, noise_mode='const')['means'][0]
    finally:
        G.gaussian_kwargs['offset_gain'] = gg.DEFAULT_GAUSSIAN_KWARGS['offset_gain']
    world = coords.mesh_to_world(v[0, :G.num_vertices])
    for t in valid[torch.randperm(len(valid), generator=torch.Generator().manual_seed(0))[:40]].tolist():
        row, col = divmod(t, u)
        p = torch.tensor([(col + 0.5) / u, 1 - (row + 0.5) / u], dtype=torch.float64)
        f = int(rast.texel_face[t])
        a, b, c = uvcoords[uvfaces[f]].double()
        m = torch.stack([b - a, c - a], dim=1)
        l1, l2 = torch.linalg.solve(m, p - a)
        bary = torch.tensor([1 - l1 - l2, l1, l2])
        assert bary.min() > -1e-5                            # the texel centre lies in its face
        expected = (bary[:, None].float() * world[faces[f]]).sum(0)
        assert torch.allclose(means[t], expected, atol=1e-5)


def test_face_tangent_follows_u_and_normals_point_out(G, head):
    rast = G.rasterizer
    uv = rast.uvcoords[rast.uvfaces].double()
    d1, d2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    step = rast.face_tangent[:, :1].double() * d1 + rast.face_tangent[:, 1:].double() * d2    # UV step along the tangent
    area = (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]).abs()
    ok = area > 1e-10
    assert (step[ok, 0] > 0).all() and torch.allclose(step[ok, 1], torch.zeros_like(step[ok, 1]), atol=1e-12)
    # Frames on the neutral head: orthonormal, normals pointing away from the head's centre.
    world = coords.mesh_to_world(head.v_template[None])
    face = rast.texel_face.clamp(min=0)
    corners = world[:, rast.faces[face]]
    frame, _ = gg._face_frames(corners[:, :, 0], corners[:, :, 1], corners[:, :, 2], rast.face_tangent[face])
    valid = rast.texel_face >= 0
    eye = frame[0, valid].transpose(1, 2) @ frame[0, valid]
    assert torch.allclose(eye, torch.eye(3).expand_as(eye), atol=1e-4)
    assert torch.allclose(torch.det(frame[0, valid]), torch.ones(int(valid.sum())), atol=1e-4)
    anchor = corners.mean(2)[0, valid]
    outward = ((anchor - world[0].mean(0)) * frame[0, valid, :, 2]).sum(-1) > 0
    assert outward.float().mean() > 0.9


def test_mouth_loop_is_the_lips_opening(G, head):
    rast = G.rasterizer
    v, lms = head()
    loop = torch.lerp(v[0, rast.mouth_edge[:, 0]], v[0, rast.mouth_edge[:, 1]], rast.mouth_t[:, None])
    corners = lms[0, [48, 54]]
    # Between the mouth corners, at the height of the inner lips, evenly spaced around the slit.
    assert loop[:, 0].min() >= corners[:, 0].min() - 2e-3 and loop[:, 0].max() <= corners[:, 0].max() + 2e-3
    assert (loop[:, 1] - lms[0, 60:68, 1].mean()).abs().max() < 0.01
    gaps = (torch.roll(loop, -1, 0) - loop).norm(dim=-1)
    assert gaps.max() < 2.5 * gaps.mean()


def test_mouth_loop_samples_on_a_plane_with_a_hole():
    """A 6 x 6 grid of unit squares with the middle 2 x 2 removed: boundary loops are the
    outer square (longest: left out as the 'neck') and the hole, perimeter 8."""
    n = 7
    verts = torch.tensor([[x, y, 0.0] for y in range(n) for x in range(n)], dtype=torch.float64)
    faces = []
    for y in range(n - 1):
        for x in range(n - 1):
            if 2 <= x <= 3 and 2 <= y <= 3:
                continue
            a, b, c, d = y * n + x, y * n + x + 1, (y + 1) * n + x + 1, (y + 1) * n + x
            faces += [[a, b, c], [a, c, d]]
    edge, t, face = gg.mouth_loop_samples(torch.tensor(faces), verts, 16)
    pts = torch.lerp(verts[edge[:, 0]], verts[edge[:, 1]], t[:, None].double())
    on_hole = ((pts[:, 0] - 3).abs().sub(1).abs() < 1e-9) & ((pts[:, 1] - 3).abs() <= 1 + 1e-9) | \
              ((pts[:, 1] - 3).abs().sub(1).abs() < 1e-9) & ((pts[:, 0] - 3).abs() <= 1 + 1e-9)
    assert on_hole.all()
    arc = (torch.roll(pts, -1, 0) - pts).abs().sum(-1)            # neighbours 0.5 apart along the square
    assert torch.allclose(arc, torch.full_like(arc, 0.5), atol=1e-6)
    assert pts[0, 0] == pytest.approx(4.0)                         # starts at the loop's largest x
    for k in range(16):                                            # each sample's face holds its edge
        assert set(edge[k].tolist()) <= set(faces[int(face[k])])
    closed = [f for f in faces]
    with pytest.raises(ValueError, match='no mouth opening'):
        gg.mouth_loop_samples(torch.tensor(closed)[: 2 * 6], verts, 4)      # one strip: one loop only


def test_outputs_and_interface(G, head):
    v = _condition(head).expand(2, -1, -1)
    c = _frontal(2)
    z = torch.randn(2, G.z_dim)
    with torch.no_grad():
        out = G(z, c, v, noise_mode='const')
    assert out['image'].shape == (2, 3, 64, 64) and out['image_raw'].shape == (2, 3, 64, 64)
    assert out['image_depth'].shape == (2, 1, 64, 64)
    assert torch.equal(out['image'], out['image_raw'])             # no super-resolution at 64
    assert out['image'].min() >= -1.002 and out['image'].max() <= 1.002
    depth = out['image_depth']
    assert depth[:, :, 0, 0].min() == pytest.approx(3.3)             # empty pixels: the background at ray_end
    assert depth[:, :, 24:40, 24:40].mean() < 3.1                      # the face, about 2.65 away
    # Lower rendering resolution: image upsampled to 64 (the training fade), raw at 32.
    with torch.no_grad():
        low = G(z, c, v, noise_mode='const', neural_rendering_resolution=32)
    assert low['image'].shape == (2, 3, 64, 64) and low['image_raw'].shape == (2, 3, 32, 32)
    # mapping / synthesis split, truncation towards w_avg, extra expression labels ignored by the camera.
    ws = G.mapping(z, torch.cat([c, torch.randn(2, 7)], dim=1))
    assert ws.shape == (2, G.num_ws, G.w_dim)
    with torch.no_grad():
        again = G.synthesis(G.mapping(z, c), c, v, noise_mode='const')
    assert torch.equal(again['image'], out['image'])


def test_expression_moves_the_image(G, head):
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(3))
    c = _frontal()
    smile = torch.zeros(1, head.n_exp)
    smile[0, 0] = 1.5
    with torch.no_grad():
        a = G(z, c, _condition(head), noise_mode='const')['image']
        b = G(z, c, _condition(head, expression=smile), noise_mode='const')['image']
    diff = (a - b).abs().sum(1)[0]
    assert diff.max() > 0.1
    assert diff[:20].max() < 0.02                                  # the top of the head does not move


def _mouth_pixel(G, head, v, c, res):
    lms = v[:, G.num_vertices:]
    centre = coords.mesh_to_world(lms[:, 60:68].mean(1, keepdim=True))
    from training.mesh.rasterize import project_perspective
    ndc = project_perspective(centre, c)[0, 0]
    return int((ndc[1] + 1) / 2 * res), int((ndc[0] + 1) / 2 * res)


@pytest.fixture(scope='module')
def G_fine():
    """tiny64-gaussian with 128 x 128 UV Gaussians: fine enough for the lips to close over the mouth."""
    torch.manual_seed(0)
    return configs.make_generator('tiny64-gaussian', uv_resolution=128, mouth_resolution=16).eval()


@pytest.mark.parametrize('jaw, visible', [(0.0, False), (0.25, True)])
def test_mouth_pocket_shows_only_when_the_jaw_opens(G_fine, head, jaw, visible):
    """The mouth network's colours reach the pixels at the mouth's centre when the jaw is open and
    are hidden behind the lips when it is closed. All Gaussians are made opaque, of the base size
    and put on their anchors (an untrained G's are translucent and scattered)."""
    G = G_fine
    v = _condition(head, jaw=jaw)
    mouth = coords.mesh_to_world(v[0, G.num_vertices + 60:G.num_vertices + 68].mean(0))
    c = _frontal(radius=1.2, pivot=tuple(mouth.tolist()))        # close up on the mouth
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(5))
    images = []
    for value in (-8.0, 8.0):
        def paint(module, args, out, value=value):
            out = _on_anchors(module, args, out)
            out[:, gg.GEOMETRY_CHANNELS:] = value                # features: black, then white
            return out
        handles = [G.mouth_synthesis.register_forward_hook(paint), G.backbone.synthesis.register_forward_hook(_on_anchors)]
        try:
            with torch.no_grad():
                images.append(G(z, c, v, noise_mode='const')['image'])
        finally:
            for handle in handles:
                handle.remove()
    row, col = _mouth_pixel(G, head, v, c, 64)
    change = (images[1] - images[0])[0, :, row - 1:row + 2, col - 1:col + 2].mean().item()
    if visible:
        assert change > 0.5
    else:
        assert abs(change) < 0.05


def _on_anchors(module, args, out):
    """A synthesis hook: every Gaussian opaque, of its base size, on its anchor, in its face frame."""
    out = out.clone()
    out[:, :10] = 0
    out[:, 10] = 6.0
    return out


def test_depth_follows_the_mesh(G_fine, head):
    """Opaque Gaussians on their anchors: image_depth (distance along each pixel's ray) equals the
    driving mesh's, as metrics/mesh_depth_error.py computes it, over the face region."""
    from metrics.mesh_depth_error import mesh_ray_depth
    G = G_fine
    v = _condition(head, jaw=0.15)
    # A wide lens (focal 1.2: 45 degrees), so that camera Z and the distance along the ray differ (by up to 8%).
    cam = coords.cam2world_look_at(torch.tensor([math.pi / 2 + 0.3]), torch.tensor([math.pi / 2 - 0.1]), radius=1.0)
    c = coords.make_label(cam, coords.intrinsics(1.2))
    handles = [net.register_forward_hook(_on_anchors) for net in (G.backbone.synthesis, G.mouth_synthesis)]
    try:
        with torch.no_grad():
            depth = G(torch.randn(1, G.z_dim), c, v, noise_mode='const')['image_depth']
    finally:
        for handle in handles:
            handle.remove()
    rast = G.rasterizer
    mesh_depth, region = mesh_ray_depth(v[:, :G.num_vertices], rast.faces, c, 64, (rast.uvcoords, rast.uvfaces, rast.uv_mask))
    assert region.sum() > 500
    error = (depth - mesh_depth).abs()[region]
    assert error.median() < 0.01 and error.mean() < 0.015, (error.median(), error.mean())   # world units; the head is ~0.5 wide


def test_gradients_reach_every_network(G, head):
    G.requires_grad_(True)
    try:
        out = G(torch.randn(2, G.z_dim), _frontal(2), _condition(head).expand(2, -1, -1))
        (out['image'].square().mean() + out['image_depth'].mean()).backward()
        for name in ('backbone.mapping', 'backbone.synthesis', 'mouth_synthesis', 'background_synthesis'):
            grads = [p.grad for n, p in G.named_parameters() if n.startswith(name)]
            assert all(g is not None for g in grads), name
            assert sum(g.abs().sum() for g in grads) > 0, name
    finally:
        G.zero_grad(set_to_none=True)
        G.requires_grad_(False)


def test_sample_density(G, head):
    v = _condition(head)
    ws = G.mapping(torch.randn(1, G.z_dim), _frontal())
    with torch.no_grad():
        g = G.make_gaussians(ws, v, noise_mode='const')
        opaque = torch.nonzero(g['opacities'][0] > 0.5).squeeze(1)[:50]
        pts = torch.cat([g['means'][:, opaque], torch.tensor([[[0.9, 0.9, 0.9]]])], dim=1)
        out = G.sample_mixed(pts, torch.zeros_like(pts), ws, v, noise_mode='const')
    assert out['sigma'].shape == (1, 51, 1) and out['rgb'].shape == (1, 51, 3)
    assert (out['sigma'][0, :50, 0] >= g['opacities'][0, opaque] - 1e-4).all()
    assert out['sigma'][0, 50, 0] == 0
    sigma_fn = G.density_function(ws, v)
    assert torch.allclose(sigma_fn(pts), out['sigma'], atol=1e-5)
    cloud = G.point_cloud(ws, v)
    assert cloud['points'].shape[1] == 3 and len(cloud['points']) == int((g['opacities'][0] >= gr.ALPHA_MIN).sum())


def test_degenerate_mesh_gives_finite_outputs(G):
    """A collapsed mesh (every vertex at the origin: zero-area faces) must not break rendering or
    the density queries of the density regularisation."""
    v = torch.zeros(2, G.num_vertices + 68, 3)
    z, c = torch.randn(2, G.z_dim), _frontal(2)
    with torch.no_grad():
        out = G(z, c, v, noise_mode='const')
        sigma = G.sample_mixed(torch.rand(2, 100, 3) * 2 - 1, torch.zeros(2, 100, 3), G.mapping(z, c), v)['sigma']
    assert all(torch.isfinite(x).all() for x in out.values()) and torch.isfinite(sigma).all()


def test_checkpoint_round_trip(G, head, tmp_path):
    path = str(tmp_path / 'net.pkl')
    persistence.save_checkpoint(path, dict(G_ema=G))
    loaded = persistence.load_checkpoint(path)['G_ema']
    assert type(loaded) is gg.GaussianGenerator and loaded.topology_loaded
    v, c, z = _condition(head), _frontal(), torch.randn(1, G.z_dim)
    with torch.no_grad():
        assert torch.equal(loaded(z, c, v, noise_mode='const')['image'], G(z, c, v, noise_mode='const')['image'])
    built = builders.build('network', dict(class_name='training.configs.make_generator', cfg='tiny64-gaussian'))
    assert type(built) is gg.GaussianGenerator


def test_errors(G, head):
    c, z = _frontal(), torch.randn(1, G.z_dim)
    with pytest.raises(ValueError, match='needs the mesh condition'):
        G(z, c)
    with pytest.raises(AssertionError, match='v \\(mesh vertices'):
        G(z, c, torch.zeros(1, 10, 3))
    fresh = gg.GaussianGenerator(**configs.generator_kwargs('tiny64-gaussian'))
    with pytest.raises(RuntimeError, match='topology is not loaded'):
        fresh(z, c, _condition(head))
    with pytest.raises(ValueError, match='unknown gaussian_kwargs'):
        gg.make_gaussian_kwargs(offset=1)
    with pytest.raises(ValueError, match='does not match the generator'):
        gg.load_topology(gg.GaussianGenerator(**{**configs.generator_kwargs('tiny64-gaussian'), 'num_vertices': 10}),
                         configs.BUNDLED_TEMPLATE)
    assert len(read_obj_vertices(configs.BUNDLED_TEMPLATE)) == G.num_vertices


def test_presets_sizes():
    for cfg, res, uv in (('tiny64-gaussian', 64, 32), ('small128-gaussian', 128, 64), ('ffhq512-gaussian', 512, 256)):
        kwargs = configs.generator_kwargs(cfg)
        assert kwargs['img_resolution'] == res and kwargs['uv_resolution'] == uv
        configs.check_rendering_resolution(cfg, res, res)                  # no super-resolution needed
    with pytest.raises(ValueError, match='no super-resolution module for 48 -> 64'):
        configs.check_rendering_resolution('tiny64-gaussian', 64, 48)
    meta = configs.make_generator('ffhq512-gaussian', device='meta')      # FLAME's sizes, no template given
    assert meta.num_vertices == 5023 and meta.superresolution is None and not meta.topology_loaded
    assert meta.rasterizer.num_gaussians == 256 ** 2 + 32 ** 2
    with_sr = configs.make_generator('tiny64-gaussian', neural_rendering_resolution=32, feature_channels=8)
    assert with_sr.superresolution is not None
    out = with_sr(torch.randn(1, with_sr.z_dim), _frontal(), _condition(load_head_model()))
    assert out['image'].shape == (1, 3, 64, 64) and out['image_raw'].shape == (1, 3, 32, 32)
