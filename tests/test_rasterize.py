"""Rasterizer tests against a brute-force reference written here (every pixel x every face)."""

import math
import os

import numpy as np
import pytest
import torch

from training import coords
from training.mesh.rasterize import Fragments, interpolate, project_perspective, rasterize


# ---------------------------------------------------------------------------------------
# Reference: float64 numpy, every pixel centre against every triangle.

def reference_rasterize(verts: np.ndarray, faces: np.ndarray, h: int, w: int, cull: bool, margin: float = 1e-4):
    """Returns pix_to_face (H, W), bary (H, W, 3), depth (H, W), ambiguous (H, W) bool.

    A pixel is ambiguous when its centre is within `margin` (in barycentric units) of an
    edge of a face that could cover it, or when the two nearest covering faces are within
    `margin` in depth: the tie rules decide those, and they are tested separately.
    """
    p2f = np.full((h, w), -1, np.int64)
    bary = np.zeros((h, w, 3))
    depth = np.full((h, w), np.inf)
    ambiguous = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            px, py = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            hits = []
            for fi, (a, b, c) in enumerate(faces):
                va, vb, vc = verts[a], verts[b], verts[c]
                normal_z = (vb[0] - va[0]) * (vc[1] - va[1]) - (vb[1] - va[1]) * (vc[0] - va[0])
                if normal_z == 0 or (cull and normal_z > 0):
                    continue
                m = np.array([[va[0], vb[0], vc[0]], [va[1], vb[1], vc[1]], [1, 1, 1]])
                lam = np.linalg.solve(m, np.array([px, py, 1.0]))
                if lam.min() < -margin:
                    continue
                if lam.min() < margin:
                    ambiguous[i, j] = True
                    continue
                hits.append((float(lam @ np.array([va[2], vb[2], vc[2]])), fi, lam))
            if hits:
                hits.sort(key=lambda t: t[0])
                if len(hits) > 1 and hits[1][0] - hits[0][0] < margin:
                    ambiguous[i, j] = True
                depth[i, j], p2f[i, j], bary[i, j] = hits[0]
    return p2f, bary, depth, ambiguous


def random_mesh(num_verts=30, num_faces=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    verts = torch.rand(num_verts, 3, generator=g) * 2.4 - 1.2
    faces = torch.stack([torch.randperm(num_verts, generator=g)[:3] for _ in range(num_faces)])
    return verts, faces


def icosphere(subdivisions: int):
    import trimesh
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(m.vertices, dtype=torch.float64), torch.tensor(m.faces, dtype=torch.int64)


# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('cull', [True, False])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_brute_force_reference(cull, seed):
    h, w = 16, 20
    verts, faces = random_mesh(seed=seed)
    frag = rasterize(verts[None], faces, (h, w), cull_backfaces=cull)
    assert isinstance(frag, Fragments)
    assert frag.pix_to_face.shape == (1, h, w) and frag.pix_to_face.dtype == torch.int64
    assert frag.bary.shape == (1, h, w, 3) and frag.depth.shape == (1, h, w)
    p2f, bary, depth, amb = reference_rasterize(verts.double().numpy(), faces.numpy(), h, w, cull)
    ok = ~amb
    assert ok.sum() > 0.7 * h * w
    assert (p2f >= 0)[ok].sum() > 50                             # the test sees real coverage
    got = frag.pix_to_face[0].numpy()
    np.testing.assert_array_equal(got[ok], p2f[ok])
    cov = ok & (p2f >= 0)
    np.testing.assert_allclose(frag.bary[0].numpy()[cov], bary[cov], atol=1e-5)
    np.testing.assert_allclose(frag.depth[0].numpy()[cov], depth[cov], atol=1e-5)
    empty = got < 0
    assert np.isinf(frag.depth[0].numpy()[empty]).all() and (frag.bary[0].numpy()[empty] == 0).all()


def test_batch_and_chunking_agree(monkeypatch):
    import training.mesh.rasterize as rz
    verts = torch.stack([random_mesh(seed=s)[0] for s in range(3)])
    faces = random_mesh(seed=0)[1]
    full = rasterize(verts, faces, 24, cull_backfaces=False)
    monkeypatch.setattr(rz, '_MAX_PAIRS', 7)                     # force many tiny chunks
    chunked = rasterize(verts, faces, 24, cull_backfaces=False)
    assert torch.equal(full.pix_to_face, chunked.pix_to_face)
    for b in range(3):
        single = rasterize(verts[b:b + 1], faces, 24, cull_backfaces=False)
        assert torch.equal(single.pix_to_face[0], full.pix_to_face[b])


def _coverage_counts(verts, faces, size):
    """How many faces cover each pixel, rasterizing every face on its own."""
    counts = torch.zeros(size, size, dtype=torch.int64)
    for f in range(len(faces)):
        counts += (rasterize(verts[None], faces[f:f + 1], size).pix_to_face[0] >= 0).long()
    return counts


def test_closed_mesh_is_watertight():
    # Random rotation of an icosphere: the front faces tile the projected disc. Every
    # pixel strictly inside the silhouette must be covered exactly once.
    verts, faces = icosphere(2)
    rot = coords.euler_to_matrix(torch.tensor([23.0, -41.0, 12.0])).double()
    verts = (verts @ rot.T) * 0.9
    size = 40
    counts = _coverage_counts(verts, faces, size)
    frag = rasterize(verts[None], faces, size)
    # Silhouette: convex hull of the projected vertices, tested with float64 half-planes.
    from scipy.spatial import ConvexHull
    hull = ConvexHull(verts[:, :2].numpy())
    centres = (2 * np.arange(size) + 1) / size - 1
    px, py = np.meshgrid(centres, centres)                       # px: columns, py: rows
    pts = np.stack([px, py], -1).reshape(-1, 2)
    signed = pts @ hull.equations[:, :2].T + hull.equations[:, 2]
    inside = (signed < -1e-9).all(1).reshape(size, size)
    outside = (signed > 1e-9).any(1).reshape(size, size)
    assert inside.sum() > 700
    assert (counts.numpy()[inside] == 1).all()
    assert (counts.numpy()[outside] == 0).all()
    assert ((frag.pix_to_face[0] >= 0).numpy() == (counts.numpy() == 1)).all()


def test_shared_edges_and_vertices_on_pixel_centres():
    # A grid whose vertices all sit exactly on pixel centres: every interior pixel centre
    # lies on an edge or a vertex, where only the fill rule decides. Exactly one face
    # must own each of them.
    n, size = 5, 16
    idx = torch.arange(2, 2 + 3 * n, 3)[: n]                      # pixel indices 2, 5, 8, ...
    ctr = (2 * idx.double() + 1) / size - 1
    gy, gx = torch.meshgrid(ctr, ctr, indexing='ij')
    verts = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.zeros(n * n, dtype=torch.float64)], -1)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            # Counter-clockwise on screen (front-facing), both diagonals used.
            faces += [[a, d, b], [b, d, e]] if (r + c) % 2 else [[a, d, e], [a, e, b]]
    faces = torch.tensor(faces)
    counts = _coverage_counts(verts, faces, size)
    lo, hi = int(idx[0]), int(idx[-1])
    interior = counts[lo + 1:hi, lo + 1:hi]
    assert (interior == 1).all()
    # The closed grid's own border: the fill rule gives the left and top border pixels to
    # the mesh and not the right and bottom ones.
    assert (counts[lo + 1:hi, lo] == 1).all() and (counts[lo + 1:hi, hi] == 0).all()
    assert (counts[lo, lo + 1:hi] == 1).all() and (counts[hi, lo + 1:hi] == 0).all()
    assert counts.sum() == (counts > 0).sum()                    # nowhere twice


def test_backface_culling():
    ccw = torch.tensor([[[-0.8, -0.8, 0.5], [-0.8, 0.8, 0.5], [0.8, 0.0, 0.5]]])   # front
    faces = torch.tensor([[0, 1, 2]])
    cross_z = ((ccw[0, 1] - ccw[0, 0]).cross(ccw[0, 2] - ccw[0, 0], dim=0))[2]
    assert cross_z < 0
    assert (rasterize(ccw, faces, 16).pix_to_face >= 0).sum() > 50
    back = faces[:, [0, 2, 1]]
    assert (rasterize(ccw, back, 16).pix_to_face >= 0).sum() == 0
    both = rasterize(ccw, back, 16, cull_backfaces=False)
    assert torch.equal(both.pix_to_face >= 0, rasterize(ccw, faces, 16).pix_to_face >= 0)


def test_equal_depth_lower_face_index_wins():
    verts = torch.tensor([[[-0.9, -0.9, 0.3], [-0.9, 0.9, 0.3], [0.9, 0.0, 0.3],
                           [-0.5, -0.9, 0.3], [-0.5, 0.9, 0.3], [0.95, 0.2, 0.3]]])
    faces = torch.tensor([[3, 4, 5], [0, 1, 2]])
    frag = rasterize(verts, faces, 16)
    ref_a = rasterize(verts, faces[:1], 16).pix_to_face[0] >= 0
    ref_b = rasterize(verts, faces[1:], 16).pix_to_face[0] >= 0
    p2f = frag.pix_to_face[0]
    assert (ref_a & ref_b).sum() > 30
    assert (p2f[ref_a] == 0).all()                               # face 0 wins where both cover
    assert (p2f[ref_b & ~ref_a] == 1).all()
    # Nearer always wins, whatever the order.
    verts2 = verts.clone()
    verts2[0, 3:, 2] = 0.5
    p2f2 = rasterize(verts2, faces, 16).pix_to_face[0]
    assert (p2f2[ref_b] == 1).all()


def test_bary_and_depth_gradients_match_finite_differences():
    verts = torch.tensor([[[-0.7, -0.6, 0.2], [-0.5, 0.8, 0.9], [0.75, 0.1, 0.4]]], dtype=torch.float64, requires_grad=True)
    faces = torch.tensor([[0, 1, 2]])
    p2f = rasterize(verts, faces, 8).pix_to_face

    def f(v):
        frag = rasterize(v, faces, 8)
        assert torch.equal(frag.pix_to_face, p2f)                # no pixel changes owner
        m = frag.pix_to_face >= 0
        return frag.bary[m], frag.depth[m]
    assert torch.autograd.gradcheck(f, (verts,), eps=1e-7, atol=1e-6)


def test_bad_input_errors():
    verts, faces = random_mesh()
    with pytest.raises(ValueError, match='verts'):
        rasterize(verts, faces, 8)
    with pytest.raises(ValueError, match='faces'):
        rasterize(verts[None], faces.float(), 8)
    with pytest.raises(ValueError, match='outside'):
        rasterize(verts[None], faces + 100, 8)
    with pytest.raises(ValueError, match='backend'):
        rasterize(verts[None], faces, 8, backend='opengl')


def test_project_perspective_hand_computed():
    c = coords.make_label(coords.cam2world_look_at(torch.tensor([math.pi / 2]), torch.tensor([math.pi / 2])))
    pts = torch.tensor([[[0.0, 0.0, 0.2], [0.1, 0.0, 0.2], [0.0, 0.1, 0.2], [0.0, 0.0, 0.0]]])
    ndc = project_perspective(pts, c)
    f = coords.FOCAL_LENGTH
    expected = torch.tensor([[[0, 0, 2.7], [2 * f * 0.1 / 2.7, 0, 2.7], [0, -2 * f * 0.1 / 2.7, 2.7], [0, 0, 2.9]]])
    torch.testing.assert_close(ndc, expected, atol=1e-5, rtol=0)


def test_perspective_correct_interpolation_lands_on_the_camera_ray():
    # A quad strongly slanted in depth. Perspective-correct interpolation of world
    # positions must give, at every covered pixel, a point that projects back onto that
    # pixel's centre; plain screen-space interpolation does not.
    c = coords.make_label(coords.cam2world_look_at(torch.tensor([math.pi / 2 + 0.3]), torch.tensor([math.pi / 2 - 0.2])))
    quad = torch.tensor([[[-0.4, -0.4, -0.4], [0.4, -0.4, 0.5], [0.4, 0.4, 0.5], [-0.4, 0.4, -0.4]]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    ndc = project_perspective(quad, c.double())
    size = 24
    frag = rasterize(ndc, faces, size, cull_backfaces=False)
    m = frag.pix_to_face[0] >= 0
    assert m.sum() > 50
    centres = (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1
    for correct, should_match in [(True, True), (False, False)]:
        pos = interpolate(quad, frag, faces, perspective_correct=correct, verts=ndc)   # (1, 3, H, W)
        back = project_perspective(pos.permute(0, 2, 3, 1).reshape(1, -1, 3), c.double()).reshape(size, size, 3)
        err = torch.maximum((back[..., 0] - centres[None, :]).abs(), (back[..., 1] - centres[:, None]).abs())[m]
        assert (err.max() < 1e-9) == should_match


def test_interpolate_per_vertex_and_per_corner_agree():
    verts, faces = random_mesh(seed=3)
    frag = rasterize(verts[None], faces, 16, cull_backfaces=False)
    attrs = torch.randn(1, len(verts), 4)
    a = interpolate(attrs, frag, faces)
    b = interpolate(attrs[0][faces], frag)                       # (F, 3, C) per corner
    c = interpolate(attrs[0][faces][None], frag)                 # (B, F, 3, C)
    assert a.shape == (1, 4, 16, 16)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert (a[:, :, frag.pix_to_face[0] < 0] == 0).all()
    # Hand check at one covered pixel.
    i, j = [int(t) for t in torch.nonzero(frag.pix_to_face[0] >= 0)[0]]
    f = frag.pix_to_face[0, i, j]
    expected = (frag.bary[0, i, j, :, None] * attrs[0, faces[f]]).sum(0)
    torch.testing.assert_close(a[0, :, i, j], expected)


# ---------------------------------------------------------------------------------------
# pytorch3d's own pure-Python reference (`rasterize_meshes_python`, the semantics of its
# kernels), recorded by tests/fixtures/make_official_fixtures.py on 82 triangles of every
# size (down to slivers), overlapping, both windings, 16 x 32 pixels.

PYTORCH3D_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'official', 'rasterizer_pytorch3d.npz')


def _pytorch3d_case():
    data = np.load(PYTORCH3D_FIXTURE)
    h, w = (int(s) for s in data['image_size'])
    v = torch.from_numpy(data['verts'])
    # pytorch3d's NDC: +x left, +y up, the shorter side spans [-1, 1] (square pixels);
    # ours: +x right, +y down, each side spans [-1, 1]. A 180 degree turn keeps the winding.
    # (16 x 32: the rescale is by a power of two, so the float32 bits carry over.)
    ours = torch.stack([-v[:, 0] * min(h, w) / w, -v[:, 1] * min(h, w) / h, v[:, 2]], dim=1)
    return data, ours[None], torch.from_numpy(data['faces']).long(), (h, w)


@pytest.mark.parametrize('cull', [True, False])
def test_matches_pytorch3d_python_reference(cull):
    data, verts, faces, size = _pytorch3d_case()
    tag = 'cull' if cull else 'nocull'
    ref_face = torch.from_numpy(data[f'pix_to_face_{tag}'])
    ref_bary = torch.from_numpy(data[f'bary_{tag}'])
    ref_z = torch.from_numpy(data[f'zbuf_{tag}'])
    frag = rasterize(verts, faces, size, cull_backfaces=cull, pytorch3d_bary=True)
    assert torch.equal(frag.pix_to_face[0], ref_face)
    hit = ref_face >= 0
    assert hit.sum() > 40
    # pytorch3d divides by (twice the area + 1e-8) in its NDC units, in float32: its
    # barycentrics sum to a little less than 1 on small faces. Ours are its bits.
    assert (ref_bary[hit].sum(-1) < 1 - 1e-3).any()
    assert torch.equal(frag.bary[0][hit], ref_bary[hit])
    # Exact barycentrics (the default) differ by up to 1e-2 on these tiny faces.
    exact = rasterize(verts, faces, size, cull_backfaces=cull)
    assert torch.equal(exact.pix_to_face, frag.pix_to_face) and torch.equal(exact.depth, frag.depth)
    assert (exact.bary[0][hit] - ref_bary[hit]).abs().max() > 1e-3
    # Our depth stays the exact interpolation; pytorch3d's zbuf is its weights times z.
    biased = ref_bary[hit].sum(-1) * frag.depth[0][hit]
    assert (biased - ref_z[hit]).abs().max() < 1e-5


def test_default_barycentrics_are_exact():
    data, verts, faces, size = _pytorch3d_case()
    frag = rasterize(verts, faces, size, cull_backfaces=False)
    hit = frag.pix_to_face[0] >= 0
    exact = rasterize(verts.double(), faces, size, cull_backfaces=False)
    assert torch.equal(exact.pix_to_face, frag.pix_to_face)
    assert torch.allclose(exact.bary[0][hit].sum(-1), torch.ones((), dtype=torch.float64), atol=1e-12)
    # float32 vertices: computed in float64, rounded once at the end.
    assert (frag.bary[0][hit].double() - exact.bary[0][hit]).abs().max() < 1e-7


def test_face_index_check_reads_a_faces_tensor_back_once_per_version(monkeypatch):
    # The range check of `faces` is one host sync (on a GPU, a wait for all queued work): a
    # model's faces buffer, the same tensor every forward, is read back once, and again
    # only after a write to it.
    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, 'aminmax', lambda t: reads.append(1) or aminmax(t))
    verts = torch.tensor([[[-0.5, -0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.5, 0.5]]])
    faces = torch.tensor([[0, 1, 2]])
    for _ in range(3):
        rasterize(verts, faces, 8, cull_backfaces=False)
    assert len(reads) == 1
    faces[0, 2] = 3                                         # a write: checked again, and refused
    with pytest.raises(ValueError, match=r'faces index vertices outside \[0, 3\)'):
        rasterize(verts, faces, 8, cull_backfaces=False)
    assert len(reads) == 2
    with pytest.raises(ValueError, match=r'faces index vertices outside \[0, 3\)'):   # remembered as bad, still refused
        rasterize(verts, faces, 8, cull_backfaces=False)
    other = torch.tensor([[0, 1, 2]])
    other[0, 0] = 0                                             # (version 1)
    rasterize(verts, other, 8, cull_backfaces=False)            # another tensor: its own check
    assert len(reads) == 3
    import copy
    duplicate = copy.deepcopy(other)                            # a copy (with the attribute), then written
    duplicate[0, 0] = 5                                         # (version 1 too)
    with pytest.raises(ValueError, match=r'faces index vertices outside \[0, 3\)'):
        rasterize(verts, duplicate, 8, cull_backfaces=False)
    reads.clear()
    with torch.inference_mode():                                 # no version counter: checked every time
        inference_faces = torch.tensor([[0, 1, 2]])
        rasterize(verts, inference_faces, 8, cull_backfaces=False)
        rasterize(verts, inference_faces, 8, cull_backfaces=False)
    assert len(reads) == 2
