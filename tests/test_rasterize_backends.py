"""The optional mesh rasterizer backends (nvdiffrast, pytorch3d) without a GPU.

Neither library installs here, so each is replaced by a stand-in module that follows the
documented behaviour of the calls our backend makes (nvdiffrast's instanced
`rasterize(ctx, pos, tri, resolution)` with its clip-space conventions and, before its
0.3.2, image sizes that are multiples of 8; pytorch3d's `Meshes` and `rasterize_meshes`
with its NDC conventions and packed face indices), computed by brute force. The tests
check how our code drives them: which backend 'auto' picks, padding to multiples of 8,
one call per batch, no host syncs, and the same fragments as our own rasterizer.
"""

import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import training.mesh.rasterize as rz
from training.mesh.rasterize import rasterize


# ---------------------------------------------------------------------------------------
# Stand-ins.

def _pixel_hits(corners: torch.Tensor, px: torch.Tensor, py: torch.Tensor):
    """Brute force: corners (B, F, 3, 3) (x, y, z), pixel centres px, py (P,) ->
    barycentrics (B, F, P, 3) and whether each pixel centre is inside each face (either winding)."""
    x, y = corners[..., 0, None], corners[..., 1, None]              # (B, F, 3, 1)

    def edge(k, l):                                                  # signed double area of (k, l, p)
        return (x[..., l, :] - x[..., k, :]) * (py - y[..., k, :]) - (y[..., l, :] - y[..., k, :]) * (px - x[..., k, :])
    area = (x[..., 1, :] - x[..., 0, :]) * (y[..., 2, :] - y[..., 0, :]) - (y[..., 1, :] - y[..., 0, :]) * (x[..., 2, :] - x[..., 0, :])
    lam = torch.stack([edge(1, 2), edge(2, 0), edge(0, 1)], dim=-1) / area[..., None]
    inside = (lam >= 0).all(-1) & (area != 0)
    return lam, inside


def _nearest(lam, inside, z, keep):
    """Nearest covering face per pixel: (B, P) index into F, -1 where none; depth test `keep(depth)`."""
    depth = (lam * z[..., None, :]).sum(-1)                          # (B, F, P)
    inside = inside & keep(depth)
    depth = torch.where(inside, depth, torch.full_like(depth, float('inf')))
    best, face = depth.min(dim=1)                                    # ties: the lower index
    return torch.where(torch.isfinite(best), face, torch.full_like(face, -1))


class StandInNvdiffrast(types.ModuleType):
    """nvdiffrast.torch, instanced mode: pos (B, V, 4) clip space, tri (F, 3) int32 shared by
    the batch; pixel (i, j) has its centre at clip x = (2j + 1) / W - 1, y = (2i + 1) / H - 1
    (row 0 at y = -1); both windings drawn, z/w outside [-1, 1] clipped, the smallest z/w wins;
    returns (rast (B, H, W, 4) = (u, v, z/w, triangle id + 1, 0 where empty), rast_db)."""

    def __init__(self, multiple_of_8: bool = True):
        super().__init__('nvdiffrast.torch')
        self.multiple_of_8 = multiple_of_8
        self.calls = []
        self.RasterizeCudaContext = lambda device=None: ('context', device)

    def rasterize(self, ctx, pos, tri, resolution, ranges=None, grad_db=True):
        self.calls.append(tuple(pos.shape))
        h, w = resolution
        if self.multiple_of_8 and (h % 8 or w % 8):
            raise RuntimeError(f'nvdiffrast: width and height must be divisible by 8, got {h} x {w}')
        assert ranges is None and pos.ndim == 3 and pos.shape[-1] == 4, 'the stand-in knows instanced mode only'
        assert pos.dtype == torch.float32 and pos.is_contiguous() and tri.dtype == torch.int32 and tri.is_contiguous()
        ndc = (pos[..., :3] / pos[..., 3:]).double()
        corners = ndc[:, tri.long()]                                 # (B, F, 3, 3)
        jj, ii = torch.meshgrid(torch.arange(w), torch.arange(h), indexing='xy')
        px = ((2 * jj + 1) / w - 1).reshape(-1).double()
        py = ((2 * ii + 1) / h - 1).reshape(-1).double()
        lam, inside = _pixel_hits(corners, px, py)
        face = _nearest(lam, inside, corners[..., 2], lambda d: (d >= -1) & (d <= 1))
        tid = (face + 1).to(torch.float32).reshape(-1, h, w)
        rast = torch.stack([torch.zeros_like(tid), torch.zeros_like(tid), torch.zeros_like(tid), tid], dim=-1)
        return rast, None


class StandInMeshes:
    """pytorch3d.structures.Meshes from padded tensors verts (B, V, 3) and faces (B, F, 3)."""

    def __init__(self, verts, faces):
        assert torch.is_tensor(verts) and torch.is_tensor(faces), 'a list means one mesh at a time'
        self.verts, self.faces = verts, faces


class StandInPytorch3d:
    """pytorch3d's rasterize_meshes with faces_per_pixel=1: +x left, +y up, the shorter image side
    spanning [-1, 1] (pixel (i, j) at x = (W - 2j - 1) / S, y = (H - 2i - 1) / S, S = min(H, W));
    zero-area faces and depths < 0 not drawn; pix_to_face packed: b * F + f."""

    def __init__(self):
        self.calls = []

    def rasterize_meshes(self, meshes, image_size, blur_radius=0.0, faces_per_pixel=1, perspective_correct=False,
                         cull_backfaces=False, **kwargs):
        self.calls.append(tuple(meshes.verts.shape))
        assert blur_radius == 0 and faces_per_pixel == 1 and not perspective_correct and not cull_backfaces
        h, w = image_size
        s = min(h, w)
        corners = torch.gather(meshes.verts[:, None].expand(-1, meshes.faces.shape[1], -1, -1), 2,
                               meshes.faces[..., None].expand(-1, -1, -1, 3)).double()   # (B, F, 3, 3)
        jj, ii = torch.meshgrid(torch.arange(w), torch.arange(h), indexing='xy')
        px = ((w - 2 * jj - 1) / s).reshape(-1).double()
        py = ((h - 2 * ii - 1) / s).reshape(-1).double()
        lam, inside = _pixel_hits(corners, px, py)
        face = _nearest(lam, inside, corners[..., 2], lambda d: d >= 0)
        bsz, nf = meshes.faces.shape[:2]
        packed = torch.where(face >= 0, face + nf * torch.arange(bsz)[:, None], face)
        p2f = packed.reshape(bsz, h, w, 1)
        return p2f, None, None, None

    def install(self, monkeypatch):
        mod = types.ModuleType('pytorch3d.renderer.mesh.rasterize_meshes')
        mod.rasterize_meshes = self.rasterize_meshes
        structures = types.ModuleType('pytorch3d.structures')
        structures.Meshes = StandInMeshes
        for name in ('pytorch3d', 'pytorch3d.renderer', 'pytorch3d.renderer.mesh'):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, 'pytorch3d.renderer.mesh.rasterize_meshes', mod)
        monkeypatch.setitem(sys.modules, 'pytorch3d.structures', structures)


@pytest.fixture
def nvdiffrast(monkeypatch):
    module = StandInNvdiffrast()
    package = types.ModuleType('nvdiffrast')
    package.torch = module
    monkeypatch.setitem(sys.modules, 'nvdiffrast', package)
    monkeypatch.setitem(sys.modules, 'nvdiffrast.torch', module)
    monkeypatch.delenv('NEXT3D_RASTERIZER', raising=False)
    return module


@pytest.fixture
def pytorch3d(monkeypatch):
    module = StandInPytorch3d()
    module.install(monkeypatch)
    monkeypatch.delenv('NEXT3D_RASTERIZER', raising=False)
    return module


class OnGpu(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device (what `auto` looks at)."""
    @property
    def is_cuda(self):
        return True


class HostSyncs(TorchDispatchMode):
    """Counts the operations that make a CUDA device wait for the host to read a result:
    scalar reads, tolist, nonzero and boolean-mask indexing (sizes known only on the device)."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.item.default}

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted_tolist(t):
            self.count += 1
            return tolist(t)
        monkeypatch.setattr(torch.Tensor, 'tolist', counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.count += 1
        elif func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.count += 1
        elif func is torch.ops.aten.repeat_interleave.Tensor and (kwargs or {}).get('output_size') is None:
            self.count += 1
        return func(*args, **(kwargs or {}))


def mesh_batch(bsz: int, seed: int = 0):
    """B random meshes of one topology (24 overlapping faces, both windings), one with a
    non-finite vertex and a zero-area face (never drawn)."""
    g = torch.Generator().manual_seed(seed)
    verts = torch.rand(bsz, 30, 3, generator=g) * 2.4 - 1.2
    faces = torch.stack([torch.randperm(30, generator=g)[:3] for _ in range(24)])
    faces[0] = torch.tensor([0, 1, 1])                                # zero area everywhere
    if bsz > 1:
        verts[1, faces[5, 0]] = float('nan')
    return verts, faces


def assert_same_fragments(got, ref):
    assert torch.equal(got.pix_to_face, ref.pix_to_face)
    torch.testing.assert_close(got.bary, ref.bary)
    torch.testing.assert_close(got.depth, ref.depth)


# ---------------------------------------------------------------------------------------
# Tests.

def test_auto_uses_our_rasterizer_even_when_the_optional_backends_import(nvdiffrast, pytorch3d):
    verts, faces = mesh_batch(2)
    ref = rasterize(verts, faces, 16, backend='pytorch')
    got = rasterize(verts.as_subclass(OnGpu), faces, 16)           # 'auto' on a CUDA tensor
    assert nvdiffrast.calls == [] and pytorch3d.calls == []
    assert_same_fragments(got, ref)


@pytest.mark.parametrize('name', ['nvdiffrast', 'pytorch3d'])
def test_optional_backends_are_opt_in_through_the_environment(nvdiffrast, pytorch3d, monkeypatch, name):
    verts, faces = mesh_batch(2)
    ref = rasterize(verts, faces, 16, backend='pytorch')
    monkeypatch.setenv('NEXT3D_RASTERIZER', name)
    got = rasterize(verts.as_subclass(OnGpu), faces, 16)
    assert len({'nvdiffrast': nvdiffrast, 'pytorch3d': pytorch3d}[name].calls) == 1
    assert_same_fragments(got, ref)
    rasterize(verts, faces, 16)                                      # CPU tensors: always ours
    assert len(nvdiffrast.calls) + len(pytorch3d.calls) == 1


def test_a_bad_backend_name_in_the_environment_is_refused(monkeypatch):
    verts, faces = mesh_batch(1)
    monkeypatch.setenv('NEXT3D_RASTERIZER', 'opengl')
    with pytest.raises(ValueError, match=r"^NEXT3D_RASTERIZER='opengl' is not a mesh rasterizer backend \(expected pytorch, nvdiffrast or pytorch3d\)$"):
        rasterize(verts, faces, 8)


# mesh_depth_err rasterizes at the fading raw resolution (e.g. 77): for nvdiffrast, sizes that
# are not multiples of 8 are padded and cropped.
@pytest.mark.parametrize('name, size', [('nvdiffrast', (16, 24)), ('nvdiffrast', (13, 21)), ('nvdiffrast', 77),
                                        ('pytorch3d', (16, 24)), ('pytorch3d', (13, 21)), ('pytorch3d', 20)])
@pytest.mark.parametrize('cull', [True, False])
def test_optional_backends_match_ours_at_any_size(nvdiffrast, pytorch3d, name, size, cull):
    verts, faces = mesh_batch(3)
    got = rasterize(verts, faces, size, cull_backfaces=cull, backend=name)
    ref = rasterize(verts, faces, size, cull_backfaces=cull, backend='pytorch')
    assert (ref.pix_to_face >= 0).sum() > 50
    assert_same_fragments(got, ref)
    assert len({'nvdiffrast': nvdiffrast, 'pytorch3d': pytorch3d}[name].calls) == 1     # the whole batch in one call


@pytest.mark.parametrize('name', ['nvdiffrast', 'pytorch3d'])
def test_optional_backends_with_nothing_to_draw(nvdiffrast, pytorch3d, name):
    verts, faces = mesh_batch(3)
    verts[2] = float('nan')                                          # a sample without one drawable face
    got = rasterize(verts, faces, (13, 21), backend=name)
    assert (got.pix_to_face[2] == -1).all() and (got.pix_to_face[0] >= 0).any()
    assert_same_fragments(got, rasterize(verts, faces, (13, 21), backend='pytorch'))
    empty = rasterize(verts, faces[:0], (13, 21), backend=name)      # no faces at all
    assert empty.pix_to_face.shape == (3, 13, 21) and (empty.pix_to_face == -1).all()


@pytest.mark.parametrize('name', ['nvdiffrast', 'pytorch3d'])
def test_optional_backends_make_no_host_syncs_per_mesh(nvdiffrast, pytorch3d, monkeypatch, name):
    visible = {'nvdiffrast': rz._visible_faces_nvdiffrast, 'pytorch3d': rz._visible_faces_pytorch3d}[name]
    counts = {}
    for bsz in (1, 4):
        verts, faces = mesh_batch(bsz)
        pverts = rz._to_pixels(verts, 16, 16)
        with HostSyncs(monkeypatch) as syncs:
            visible(pverts, verts, faces, 16, 16, True)
        assert syncs.count == 0
        with HostSyncs(monkeypatch) as syncs:
            rasterize(verts, faces, 16, backend=name)
        counts[bsz] = syncs.count
    assert counts[1] == counts[4]
    assert len(nvdiffrast.calls) + len(pytorch3d.calls) == 4         # one per batch


def test_host_sync_counter_sees_syncs(monkeypatch):
    x = torch.randn(5)
    with HostSyncs(monkeypatch) as syncs:
        x[x > 0]
        torch.nonzero(x)
        x.tolist()
        float(x.sum())
    assert syncs.count == 4
