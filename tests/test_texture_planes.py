"""Texture-to-tri-plane rasterization: geometric consistency, hole filling, layouts."""

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from torch_utils import persistence
from training import coords
from training.mesh.rasterize import interpolate, rasterize
from training.mesh.texture_planes import VIEW_NAMES, TexturePlaneRasterizer, fill_enclosed, view_transform


# --- test meshes ---------------------------------------------------------------------------

def ellipsoid(subdivisions=3, centre=(0.012, 0.018, -0.006), radii=(0.075, 0.1, 0.085)):
    import trimesh
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = torch.tensor(m.vertices, dtype=torch.float32) * torch.tensor(radii) + torch.tensor(centre)
    return v, torch.tensor(m.faces, dtype=torch.int64)


def cube_map_uvs(verts, faces):
    """Per-corner UVs (3F, 2): each face goes to one of six atlas cells by the dominant axis
    of its normal and is projected along that axis, so every chart is injective."""
    tri = verts[faces]
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    axis = n.abs().argmax(1)
    chart = axis * 2 + (n.gather(1, axis[:, None])[:, 0] < 0).long()           # 0..5
    lo, hi = verts.min(0).values, verts.max(0).values
    unit = (tri - lo) / (hi - lo)                                               # (F, 3, 3) in [0, 1]
    keep = torch.tensor([[1, 2], [0, 2], [0, 1]])[axis]                          # the two other axes
    uv_local = torch.gather(unit, 2, keep[:, None, :].expand(-1, 3, -1))        # (F, 3, 2)
    cell = torch.stack([chart % 3, chart // 3], -1).float()                    # 3 x 2 atlas
    uv = (cell[:, None] + 0.05 + 0.9 * uv_local) / torch.tensor([3.0, 2.0])
    return uv.reshape(-1, 2)


def position_texture(verts, faces, uv_corner, size=384):
    """(1, 3, size, size) texture holding the mesh point (metres) mapped to each texel,
    made by rasterizing the mesh in UV space, dilated a few texels past the charts."""
    uv_ndc = torch.stack([uv_corner[:, 0] * 2 - 1, 1 - uv_corner[:, 1] * 2, torch.zeros(len(uv_corner))], -1)
    uv_faces = torch.arange(len(uv_corner)).view(-1, 3)
    frag = rasterize(uv_ndc[None].double(), uv_faces, size, cull_backfaces=False)
    tex = interpolate(verts[faces].double()[None], frag)                        # (1, 3, S, S)
    have = (frag.pix_to_face >= 0)[:, None].double()
    for _ in range(4):                                                          # dilate into the gaps
        k = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float64).view(1, 1, 3, 3)
        s = F.conv2d(tex * have, k.expand(3, 1, 3, 3), padding=1, groups=3)
        c = F.conv2d(have, k, padding=1)
        fill = (have == 0) & (c > 0)
        tex = torch.where(fill, s / c.clamp(min=1), tex)
        have = torch.maximum(have, fill.double())
    return tex.float()


def make_module(verts, faces, size, **kwargs):
    uv = cube_map_uvs(verts, faces)
    mod = TexturePlaneRasterizer(num_faces=len(faces), num_uvs=len(uv), image_size=size, **kwargs)
    mod.load_topology(faces, torch.arange(len(uv)).view(-1, 3), uv)
    return mod, uv


def surface_samples(verts, faces, per_face=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(len(faces), per_face, 2, generator=g)
    r = torch.where(r.sum(-1, keepdim=True) > 1, 1 - r, r)
    bary = torch.cat([1 - r.sum(-1, keepdim=True), r], -1)                      # (F, K, 3)
    pts = (bary[..., None] * verts[faces][:, None]).sum(-2)                     # (F, K, 3)
    tri = verts[faces]
    n = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1)
    return pts.reshape(-1, 3), n[:, None].expand(-1, per_face, -1).reshape(-1, 3)


def sample_plane(plane, pts, plane_index, plane_axes='next3d'):
    """Plane (C, H, W), mesh points (N, 3) -> features (N, C) at the points' world position."""
    g = coords.project_onto_planes(coords.mesh_to_world(pts)[None], plane_axes)[0, plane_index]
    return F.grid_sample(plane[None], g[None, None], mode='bilinear', align_corners=False)[0, :, 0].T


# --- geometric consistency -----------------------------------------------------------------

# Direction from the surface towards each view's viewer ('aligned' layout, mesh axes).
VIEWER = {'front': (0, 0, 1), 'left': (-1, 0, 0), 'right': (1, 0, 0), 'top': (0, 1, 0)}


def test_viewer_directions_follow_from_the_view_transforms():
    for name in VIEW_NAMES:
        lin, _ = view_transform(name, 'aligned')
        assert torch.det(lin) > 0                                # proper rotation (x 5)
        towards_viewer = -lin[2] / lin[2].norm()                 # NDC depth grows away from the viewer
        torch.testing.assert_close(towards_viewer, torch.tensor(VIEWER[name], dtype=torch.float32))
    for name in VIEW_NAMES:
        assert torch.det(view_transform(name, 'released')[0]) < 0


def test_every_visible_point_samples_its_own_coordinates():
    size = 64
    verts, faces = ellipsoid()
    mod, uv = make_module(verts, faces, size)
    tex = position_texture(verts, faces, uv)
    views = mod.render_views(verts[None], tex)
    (front, fa), (left, la), (right, ra), (top, ta) = [(views[n][0][0], views[n][1][0]) for n in VIEW_NAMES]
    # Each yaw view checked on its own, before the sum; `to_planes` decides the plane.
    def planes_of(side, side_alpha):
        return (mod.to_planes(front[None], side[None], top[None])[0],
                mod.to_planes(fa[None], side_alpha[None], ta[None])[0])
    planes = {'front': planes_of(left, la), 'left': planes_of(left, la), 'top': planes_of(left, la),
              'right': planes_of(mod.mirror_right_view(right), mod.mirror_right_view(ra))}
    plane_of = {'front': 0, 'top': 1, 'left': 2, 'right': 2}     # next3d: (x, y), (x, z), (z, y)
    pts, normals = surface_samples(verts, faces)
    pixel = 0.4 / size                                           # one plane pixel in metres
    for name in VIEW_NAMES:
        facing = normals @ torch.tensor(VIEWER[name], dtype=torch.float32)
        visible = facing > 0.3                                   # convex: visible iff facing the viewer (not grazing)
        feat_planes, alpha_planes = planes[name]
        # Only where the bilinear footprint lies inside the silhouette (the plane is 0 outside).
        inside = sample_plane(alpha_planes[plane_of[name]], pts, plane_of[name])[:, 0] > 0.999
        visible &= inside
        assert visible.sum() > 500
        feat = sample_plane(feat_planes[plane_of[name]], pts[visible], plane_of[name])
        err = (feat - pts[visible]).abs().max(dim=1).values
        assert err.max() < pixel, f'{name}: max error {err.max() * 1000:.2f} mm, pixel {pixel * 1000:.2f} mm'
        # Points facing away sample the surface in front of them: the in-plane coordinates
        # agree, the depth coordinate does not.
        hidden = facing < -0.35
        feat_h = sample_plane(feat_planes[plane_of[name]], pts[hidden], plane_of[name])
        depth_axis = int(np.argmax(np.abs(VIEWER[name])))
        assert (feat_h - pts[hidden]).abs()[:, depth_axis].median() > 0.05
    # Negative control: the front render used as plane 0 without its row flip is far off.
    feat = sample_plane(front, pts[normals[:, 2] > 0.3], 0)
    assert (feat - pts[normals[:, 2] > 0.3]).abs().max(dim=1).values.median() > 4 * pixel
    # The summed side plane equals the two yaw planes added.
    out = mod(verts[None], tex)
    torch.testing.assert_close(out['side'][0], left + mod.mirror_right_view(right))


def test_released_layout_assignment_and_orientation():
    verts, faces = ellipsoid(subdivisions=2)
    mod, uv = make_module(verts, faces, 32, layout='released')
    tex = torch.randn(1, 4, 16, 16)
    out = mod(verts[None], tex)
    planes = mod.to_planes(out['front'], out['side'], out['top'])
    assert torch.equal(planes[:, 0], out['front'])
    assert torch.equal(planes[:, 1], out['side'])                # side on (x, z): the original's mismatch
    assert torch.equal(planes[:, 2], out['top'])
    views = mod.render_views(verts[None], tex)
    torch.testing.assert_close(out['side'], views['left'][0] + views['right'][0])   # no mirroring
    # Empty pixels hold the texture sampled at the UV centre, as in the released code.
    centre = F.grid_sample(tex, torch.zeros(1, 1, 1, 2), align_corners=False)[0, :, 0, 0]
    empty = views['front'][1][0, 0] == 0
    torch.testing.assert_close(out['front'][0][:, empty].T, centre.expand(int(empty.sum()), -1))
    # The front image is upside down: the top of the ellipsoid (+y) is in the last rows.
    rows = torch.nonzero(views['front'][1][0, 0] > 0)[:, 0]
    lms = mod.project_landmarks_front(torch.tensor([[[0.0, 0.11, 0.0], [0.0, -0.09, 0.0]]]))
    assert lms[0, 0, 1] > lms[0, 1, 1]
    assert abs(float(rows.max()) + 0.5 - float(lms[0, 0, 1])) < 2.5


@pytest.mark.parametrize('layout', ['aligned', 'released'])
def test_faces_range_is_read_back_once_per_topology(monkeypatch, layout):
    # The rasterizer checks the faces' range with a host read (a GPU sync): a module's faces,
    # mirrored or not, are checked once, and again after a new topology is loaded.
    verts, faces = ellipsoid(subdivisions=1)
    mod, uv = make_module(verts, faces, 16, layout=layout)
    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, 'aminmax', lambda t: reads.append(1) or aminmax(t))
    tex = torch.randn(1, 4, 8, 8)
    first = [mod(verts[None], tex) for _ in range(3)][0]
    assert len(reads) == 1
    mod.load_topology(faces, torch.arange(len(uv)).view(-1, 3), uv)
    again = mod(verts[None], tex)
    assert len(reads) == 2
    for k in first:
        assert torch.equal(first[k], again[k]), k


def test_aligned_front_is_upright_and_landmarks_hand_computed():
    mod = TexturePlaneRasterizer(num_faces=1, num_uvs=3, image_size=256)
    lms = torch.tensor([[[0.0, 0.01, 0.0], [0.02, 0.05, 0.3]]])
    px = mod.project_landmarks_front(lms)
    torch.testing.assert_close(px, torch.tensor([[[128.0, 128.0], [140.8, 102.4]]]))
    rel = TexturePlaneRasterizer(num_faces=1, num_uvs=3, image_size=256, layout='released')
    torch.testing.assert_close(rel.project_landmarks_front(lms)[0, 1], torch.tensor([140.8, 166.4]))


# --- holes -----------------------------------------------------------------------------------

def annulus(inner=0.03, outer=0.08, n=24, gap=False, z=0.02):
    ang = torch.linspace(0, 2 * np.pi, n + 1)[:-1]
    if gap:
        ang = ang * (1 - 1 / n)                                  # leave one wedge out
    ring = lambda r: torch.stack([r * torch.cos(ang), r * torch.sin(ang) + 0.01, torch.full_like(ang, z)], -1)
    verts = torch.cat([ring(inner), ring(outer)])
    faces = []
    for i in range(n - (1 if gap else 0)):
        j = (i + 1) % n
        faces += [[i, n + i, n + j], [i, n + j, j]]
    faces = torch.tensor(faces)
    tri = verts[faces]
    nz = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)[:, 2]
    faces = torch.where((nz < 0)[:, None], faces[:, [0, 2, 1]], faces)   # face +z, the front viewer
    return verts, faces


@pytest.mark.parametrize('gap', [False, True])
def test_enclosed_hole_gets_alpha_one(gap):
    verts, faces = annulus(gap=gap)
    mod, uv = make_module(verts, faces, 64)
    out = mod(verts[None], torch.rand(1, 3, 16, 16))
    alpha = out['front_alpha'][0, 0]
    centre = alpha[30:34, 30:34]                                 # the hole around the ring's centre
    vis = rasterize(mod.to_view_ndc(verts[None])[0], mod.faces, 64).pix_to_face[0] >= 0
    assert not vis[30:34, 30:34].any()
    assert (centre == 1).all() if not gap else (centre == 0).all()
    assert out['front'][0][:, 30:34, 30:34].abs().max() == 0   # 'aligned': fills alpha only
    assert alpha[0].abs().max() == 0 and alpha[:, 0].abs().max() == 0


def test_spread_along_runs_marks_whole_runs():
    # Each run of passable pixels along a line becomes reachable as a whole if any pixel of it
    # is; impassable pixels never are. Against a loop over the lines, rectangular images.
    from training.mesh.texture_planes import _spread_along_runs
    g = torch.Generator().manual_seed(3)
    passable = torch.rand(3, 7, 11, generator=g) > 0.3
    reach = torch.rand(3, 7, 11, generator=g) > 0.8
    for dim in (1, 2):
        expected = torch.zeros_like(passable)
        p, r, e = (t.movedim(dim, -1) for t in (passable, reach, expected))
        for i in range(p.shape[0]):
            for j in range(p.shape[1]):
                start = 0
                for k in range(p.shape[2] + 1):
                    if k == p.shape[2] or not p[i, j, k]:
                        if bool((r[i, j, start:k] & p[i, j, start:k]).any()):
                            e[i, j, start:k] = True
                        start = k + 1
        assert torch.equal(_spread_along_runs(reach, passable, dim), expected)
    empty = torch.zeros(2, 0, 5, dtype=torch.bool)
    assert _spread_along_runs(empty, empty, 1).shape == (2, 0, 5) and _spread_along_runs(empty, empty, 2).shape == (2, 0, 5)


@pytest.mark.parametrize('path', ['labels', 'runs'])
def test_fill_enclosed_matches_connected_components(monkeypatch, path):
    # Random blobs plus a spiral wall: compare with scipy's 4-connected labelling, image by
    # image, for the CPU's path (one labelling of the batch) and the other devices' (runs).
    from training.mesh import texture_planes
    if path == 'runs':
        calls = []
        monkeypatch.setattr(texture_planes, '_reachable_by_labels', lambda p: calls.append(1) or texture_planes._reachable_by_runs(p, 1024))
    g = torch.Generator().manual_seed(1)
    for trial in range(3):
        a = (torch.rand(2, 1, 48, 48, generator=g) > 0.62).float()
        a[1, 0] = 0
        for k in range(4, 24, 4):                                # nested square walls with gaps: many turns
            a[1, 0, k, k:48 - k] = a[1, 0, 47 - k, k:48 - k] = 1
            a[1, 0, k:48 - k, k] = a[1, 0, k:48 - k, 47 - k] = 1
            a[1, 0, k + 1 if (k // 4) % 2 else 46 - k, k] = 0    # alternate the door side
        a[0, 0, 5, 5:9] = 0.5                                    # partial alpha is passable
        got = fill_enclosed(a)
        for i in range(2):
            passable = (a[i, 0] * 255 <= 254).numpy()
            lab, _ = scipy.ndimage.label(passable)
            border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
            reach = np.isin(lab, list(border))
            expected = np.where(reach, a[i, 0].numpy(), 1.0)
            np.testing.assert_array_equal(got[i, 0].numpy(), expected)
    if path == 'runs':
        assert calls
    assert fill_enclosed(torch.zeros(0, 1, 8, 8)).shape == (0, 1, 8, 8)


# --- side alpha, gradients, persistence ---------------------------------------------------

def quad_facing(direction, size=0.05):
    """A square facing +x or -x, seen by exactly one of the two yaw views."""
    s = size
    verts = torch.tensor([[0.0, -s, -s], [0.0, s, -s], [0.0, s, s], [0.0, -s, s]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    nx = torch.linalg.cross(verts[1] - verts[0], verts[2] - verts[0], dim=-1)[0]
    if (nx > 0) != (direction > 0):
        faces = faces[:, [0, 2, 1]]
    return verts, faces


def test_side_alpha_or_vs_released():
    verts, faces = quad_facing(+1)                               # only the viewer at +x ('right') sees it
    tex = torch.ones(1, 3, 8, 8)
    outs = {}
    for mode in ('or', 'released'):
        mod, _ = make_module(verts, faces, 32, side_alpha=mode)
        views = mod.render_views(verts[None], tex)
        assert views['left'][1].sum() == 0 and views['right'][1].sum() > 0
        outs[mode] = mod(verts[None], tex)
    assert torch.equal(outs['or']['side_alpha'], (mod.mirror_right_view(views['right'][1]) > 0).float())
    assert outs['released']['side_alpha'].sum() == 0             # the original's bug: one view ORed with itself
    assert torch.equal(outs['or']['side'], outs['released']['side'])


def test_gradients_reach_the_texture():
    verts, faces = ellipsoid(subdivisions=1)
    mod, _ = make_module(verts, faces, 8)
    mod = mod.double()
    tex = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(t):
        out = mod(verts[None].double(), t)
        return out['front'], out['side'], out['top']
    assert torch.autograd.gradcheck(f, (tex,), eps=1e-6, atol=1e-6)
    out = mod(verts[None].double(), tex)
    out['front'].sum().backward()
    assert tex.grad.abs().sum() > 0


@pytest.mark.parametrize('layout', ['aligned', 'released'])
def test_texture_lookup_table_path_matches_grid_sample(monkeypatch, layout):
    # Renders of 16 x 16 pixels read an 8 x 8 texture through bilinear_mean's CPU table path
    # (4 views x 256 pixels >= 64 texels): the same renders and texture gradient as grid_sample.
    from torch_utils.ops import bilinear_mean as BM
    verts, faces = ellipsoid(subdivisions=2)
    mod, _ = make_module(verts, faces, 16, layout=layout)
    mod = mod.double()
    tex = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    v = torch.stack([verts, verts * 1.1]).double()
    outs, grads = [], []
    for reference in (False, True):
        if reference:
            monkeypatch.setattr(BM, 'bilinear_mean', lambda im, g: F.grid_sample(
                im[:, 0], g[:, 0, None], mode='bilinear', padding_mode='zeros', align_corners=False)[:, :, 0].transpose(1, 2))
        out = mod(v, tex)
        outs.append(out)
        grads.append(torch.autograd.grad(sum((out[k] * (i + 1)).sum() for i, k in enumerate(['front', 'side', 'top'])), tex)[0])
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key], atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=0)
    assert outs[0]['front'].abs().sum() > 0 and grads[0].abs().sum() > 0


def test_persistence_round_trip_and_bad_input(tmp_path):
    verts, faces = ellipsoid(subdivisions=1)
    mod, uv = make_module(verts, faces, 16, layout='released', side_alpha='released')
    mod.uv_mask[..., :100, :] = 0.5
    path = tmp_path / 'tp.pkl'
    persistence.save_checkpoint(str(path), dict(G=mod))
    back = persistence.load_checkpoint(str(path))['G']
    assert isinstance(back, TexturePlaneRasterizer) and back.layout == 'released' and back.side_alpha == 'released'
    for name in ('faces', 'uvfaces', 'uvcoords', 'uv_mask'):
        assert torch.equal(getattr(back, name), getattr(mod, name))
    tex = torch.randn(1, 3, 8, 8)
    a, b = mod(verts[None], tex), back(verts[None], tex)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match='layout'):
        TexturePlaneRasterizer(num_faces=1, num_uvs=3, layout='flipped')
    with pytest.raises(ValueError, match='side_alpha'):
        TexturePlaneRasterizer(num_faces=1, num_uvs=3, side_alpha='and')
    with pytest.raises(ValueError, match='faces'):
        mod.load_topology(faces[:-1], faces[:-1], uv)


def test_from_template(tmp_path):
    from PIL import Image
    from training.mesh import obj_io
    verts, faces = ellipsoid(subdivisions=1)
    uv = cube_map_uvs(verts, faces).numpy()
    obj_io.write_obj(tmp_path / 't.obj', verts.numpy(), faces.numpy(), uv, np.arange(len(uv)).reshape(-1, 3))
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    Image.fromarray(mask).save(tmp_path / 'm.png')
    mod = TexturePlaneRasterizer.from_template(tmp_path / 't.obj', tmp_path / 'm.png', image_size=16)
    assert mod.faces.shape == (len(faces), 3) and torch.equal(mod.faces, faces)
    torch.testing.assert_close(mod.uvcoords, torch.tensor(uv), atol=1e-6, rtol=0)
    assert mod.uv_mask.shape == (1, 1, 256, 256)
    assert (mod.uv_mask[0, 0, :128] == 1).all() and (mod.uv_mask[0, 0, 128:] == 0).all()
    obj_io.write_obj(tmp_path / 'nouv.obj', verts.numpy(), faces.numpy())
    with pytest.raises(ValueError, match='nouv.obj'):
        TexturePlaneRasterizer.from_template(tmp_path / 'nouv.obj')


# --- the bundled head model -----------------------------------------------------------------

@pytest.fixture(scope='module')
def head():
    from training.mesh.head_model import default_head_model_dir, load_head_model, load_template
    flame = load_head_model()
    faces, uvcoords, uvfaces = load_template(default_head_model_dir() + '/head_template.obj')
    jaw = torch.tensor([[0.3, 0.0, 0.0]])
    verts, lms = flame(jaw_pose=jaw)
    eyeball = (flame.lbs_weights.argmax(1) >= 3)[faces].any(1)   # eye joints 3 and 4
    return verts[0], lms[0], faces, uvcoords, uvfaces, eyeball


def test_head_open_mouth_hole_gets_alpha_one(head):
    verts, lms, faces, uvcoords, uvfaces, _ = head
    mod = TexturePlaneRasterizer(num_faces=len(faces), num_uvs=len(uvcoords), image_size=128)
    mod.load_topology(faces, uvfaces, uvcoords)                   # mask of ones: alpha = visibility
    out = mod(verts[None], torch.rand(1, 3, 32, 32))
    # Centre of the open mouth: midpoint of the inner lips' middle points 62 and 66.
    px = mod.project_landmarks_front(lms[None])[0]
    cx, cy = ((px[62] + px[66]) / 2).floor().long().tolist()
    frag = rasterize(mod.to_view_ndc(verts[None])[0], faces, 128)
    assert frag.pix_to_face[0, cy, cx] < 0                      # a real hole: no surface there
    assert out['front_alpha'][0, 0, cy, cx] == 1                # filled
    assert out['front_alpha'][0, 0, 0, 0] == 0


def test_head_visible_points_sample_their_coordinates(head):
    # Non-convex: visibility from a depth buffer at 4x the plane resolution. A point counts
    # as seen when the surface around it (+-1 plane pixel) is covered, continuous and is
    # the point's own surface, with depth varying by less than 2 pixels over that window
    # (a slope under 1: bilinear plane sampling then errs by under a pixel at creases); there
    # the feature must match to within a pixel.
    verts, lms, faces, uvcoords, uvfaces, eyeball = head
    size = 64
    mod = TexturePlaneRasterizer(num_faces=len(faces), num_uvs=len(uvcoords), image_size=size)
    mod.load_topology(faces, uvfaces, uvcoords)
    skin = ~eyeball                                              # eyeball UVs overlap the lids' in the template
    tex = position_texture(verts, faces[skin], uvcoords[uvfaces[skin]].reshape(-1, 2), size=1024)
    views = mod.render_views(verts[None], tex)
    (front, fa), (left, la), (right, ra), (top, ta) = [(views[n][0][0], views[n][1][0]) for n in VIEW_NAMES]
    planes = {'front': (mod.to_planes(front[None], left[None], top[None])[0], 0),
              'left': (mod.to_planes(front[None], left[None], top[None])[0], 2),
              'right': (mod.to_planes(front[None], mod.mirror_right_view(right)[None], top[None])[0], 2),
              'top': (mod.to_planes(front[None], left[None], top[None])[0], 1)}
    pts, _ = surface_samples(verts, faces[skin], per_face=2)
    hi, pixel = 4 * size, 0.4 / size
    ndc_all = mod.to_view_ndc(verts[None])
    ndc_pts = mod.to_view_ndc(pts[None])
    for v, name in enumerate(VIEW_NAMES):
        frag = rasterize(ndc_all[v], faces, hi)
        depth = frag.depth[0]
        # Eyeball pixels read the lids' texels (shared UVs in the template): stay clear of them.
        eye_px = (eyeball[frag.pix_to_face[0].clamp(min=0)] & (frag.pix_to_face[0] >= 0)).float()
        near_eye = F.max_pool2d(eye_px[None, None], 9, 1, 4)[0, 0] > 0
        # Window of +-1 plane pixel (+-4 fine pixels) around each point.
        win = F.max_pool2d(depth[None, None], 9, 1, 4)[0, 0], -F.max_pool2d(-depth[None, None], 9, 1, 4)[0, 0]
        col = ((ndc_pts[v, 0, :, 0] + 1) * hi / 2).long().clamp(0, hi - 1)
        row = ((ndc_pts[v, 0, :, 1] + 1) * hi / 2).long().clamp(0, hi - 1)
        d = ndc_pts[v, 0, :, 2]
        dmax, dmin = win[0][row, col], win[1][row, col]
        seen = (dmax.isfinite() & (dmax - dmin < 2 * 2 / size) & ((d - depth[row, col]).abs() < 2 / hi)
                & ~near_eye[row, col])
        assert seen.sum() > 300, name
        plane, k = planes[name]
        feat = sample_plane(plane[k], pts[seen], k)
        err = (feat - pts[seen]).abs().max(dim=1).values
        assert err.max() < pixel, f'{name}: max error {err.max() * 1000:.2f} mm at {int(seen.sum())} points'


# --- geometry made beforehand (the data loader's workers) ------------------------------------

@pytest.mark.parametrize('layout', ['aligned', 'released'])
def test_geometry_made_beforehand_gives_the_same_renders_and_splits_by_item(layout):
    verts, faces = ellipsoid()
    mod, uv = make_module(verts, faces, 32, layout=layout)
    batch = torch.stack([verts, verts * 1.05 + 0.003])                          # two different meshes
    tex = torch.randn(2, 5, 48, 48, requires_grad=True)
    geometry = mod.geometry(batch)
    assert geometry.grid.shape == (2, 4 * 32 * 32, 2) and geometry.covered.shape == (2, 4, 32 * 32)
    assert geometry.alpha.shape == (2, 4, 1, 32, 32) and geometry.covered.any() and not geometry.covered.all()
    inside = mod(batch, tex)
    given = mod(batch, tex, geometry)
    assert inside.keys() == given.keys()
    for key in inside:
        torch.testing.assert_close(given[key], inside[key], rtol=0, atol=0, msg=key)
    grads = [torch.autograd.grad(sum(r[k].square().sum() for k in r), tex)[0] for r in (inside, given)]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    # The geometry given is the one used: another mesh's renders it, whatever the vertices passed.
    other = mod(batch, tex, mod.geometry(batch.flip(0)))
    flipped = mod(batch.flip(0), tex)
    assert not torch.equal(other['front'], inside['front'])
    for key in inside:
        torch.testing.assert_close(other[key], flipped[key], rtol=0, atol=0, msg=key)
    # Batch first: a batch's geometry is its items' geometry, concatenated.
    for field, whole in zip(geometry._fields, geometry):
        parts = [getattr(mod.geometry(batch[i:i + 1]), field) for i in range(2)]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0, msg=field)


def test_geometry_of_another_size_is_refused():
    verts, faces = ellipsoid()
    mod, _ = make_module(verts, faces, 32)
    other, _ = make_module(verts, faces, 16)
    with pytest.raises(AssertionError, match='geometry.grid'):
        mod(verts[None], torch.randn(1, 5, 48, 48), other.geometry(verts[None]))
