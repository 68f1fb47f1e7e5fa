"""Hard triangle rasterization in the project's NDC frame (see `training.coords`).

Input vertices are already projected: x in [-1, 1] left to right (columns), y in [-1, 1]
top to bottom (rows), z = depth (smaller is nearer). Pixel centres sit at (2i + 1) / n - 1,
grid_sample's align_corners=False convention. One face per pixel, nearest surface wins,
depth and barycentrics are linear in screen space (no perspective correction; see
`interpolate(..., perspective_correct=True)` for the perspective path).

Rules that make the output deterministic and watertight:
  * Front faces: the NDC frame (x right, y down, z forward) is right-handed, so a face is
    front-facing when (v1 - v0) x (v2 - v0) has negative z, i.e. its vertices run
    counter-clockwise as seen on the screen (rows growing downwards).
  * A pixel centre exactly on an edge belongs to the face that lies to the edge's right
    or, for horizontal edges, below it (the top-left rule in screen space). Each edge
    function is evaluated from the edge's lower-index vertex, so two faces that share an
    edge compute bitwise-identical values of opposite sign: a closed mesh has no cracks
    and no pixel is covered twice by faces that share an edge.
  * Equal depth at a pixel (compared in float32): the lower face index wins.
  * Empty pixels: pix_to_face = -1, bary = 0, depth = +inf.
  * No clipping: vertices may have any finite depth, including negative. Faces with a
    non-finite vertex and zero-area faces are never drawn.

Precision: the visible face is chosen in the vertices' dtype; the barycentrics and depth
of the chosen faces are then computed in float64 (and returned in the vertices' dtype):
edge functions of pixels inside faces a fraction of a pixel wide cancel badly in float32
(errors up to 3e-3 on the head model's faces at 64 pixels).

`pytorch3d_bary=True` computes the barycentrics with pytorch3d's own arithmetic instead
(the rasterizer of the official Next3D code; `rasterize_meshes_python` and its kernels):
edge functions in its NDC units (a pixel is 2 / min(H, W) wide; its x and y are ours
negated, which leaves every product unchanged), in the vertices' dtype, each divided by
twice the face area + 1e-8. The weights of a face of area A thus sum to A / (A + 1e-8):
1 - 1e-3 on the smallest faces of FLAME at a 256 render, which textures of magnitude ~20
turn into feature differences of ~0.02 that official weights were trained with. Given
float32 vertices with the same bits as pytorch3d's (and H / W a power of two), the
barycentrics equal its reference bit for bit. Coverage, the chosen face and the depth
(the exact interpolation) are not affected.

Backends: 'pytorch' (ours, the reference; vectorised, CPU and GPU, memory bounded by
chunks of face-pixel candidates), 'nvdiffrast' and 'pytorch3d' (optional: they choose the
visible face per pixel, one call per batch, then barycentrics and depth are recomputed
here with the same formulas, so all backends agree except where depths (nearly) tie or a
pixel centre lies exactly on an edge: their tie and fill rules are their own). The optional
backends have never run on a GPU in this repository (neither installs on CPU; their
tests use stand-in modules), so they are opt-in: an explicit `backend=` name, or the
environment variable NEXT3D_RASTERIZER=nvdiffrast|pytorch3d for the 'auto' calls on
CUDA tensors (the default 'auto' is ours, whatever imports).
"""

from typing import NamedTuple, Tuple, Union

import torch

import dnnlib
from torch_utils import misc
from training import coords


class Fragments(NamedTuple):
    """Per-pixel rasterization result.

    pix_to_face: (B, H, W) int64, index into `faces`, -1 where no face is visible.
    bary:        (B, H, W, 3) float, screen-space barycentrics of the visible face
                 (weights of its vertices 0, 1, 2); 0 where empty.
    depth:       (B, H, W) float, screen-space interpolated z; +inf where empty.
    """
    pix_to_face: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor


_EMPTY_KEY = torch.iinfo(torch.int64).max
_MAX_PAIRS = 1 << 21     # face-pixel candidates per chunk (~ 100 MB of temporaries)


def _image_hw(image_size) -> Tuple[int, int]:
    if isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = (int(s) for s in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f'image_size must be positive, got {image_size}')
    return h, w


def _index_range(faces: torch.Tensor) -> Tuple[int, int]:
    """(min, max) of a non-empty index tensor, in one host sync, remembered on the tensor for
    its memory and version: a model's faces buffer (the same tensor every forward, changed
    only by writes that bump its version) is read back once, not once per forward (a GPU
    sync)."""
    key = misc.version_key(faces)               # None for inference tensors: checked every time
    cached = getattr(faces, '_next3d_index_range', None)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    bounds = tuple(torch.stack(torch.aminmax(faces)).tolist())
    if key is not None:
        try:
            faces._next3d_index_range = (key, bounds)
        except (AttributeError, RuntimeError):  # tensors that take no attributes (e.g. under tracing)
            pass
    return bounds


def _check_inputs(verts: torch.Tensor, faces: torch.Tensor):
    if verts.ndim != 3 or verts.shape[-1] != 3:
        raise ValueError(f'verts must be (B, V, 3), got {tuple(verts.shape)}')
    if not verts.is_floating_point():
        raise ValueError(f'verts must be floating point, got {verts.dtype}')
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f'faces must be (F, 3), got {tuple(faces.shape)}')
    if faces.dtype not in (torch.int32, torch.int64):
        raise ValueError(f'faces must be an integer tensor, got {faces.dtype}')
    if faces.numel() > 0:
        lo, hi = _index_range(faces)
        if lo < 0 or hi >= verts.shape[1]:
            raise ValueError(f'faces index vertices outside [0, {verts.shape[1]})')
    if faces.shape[0] >= 2**31:
        raise ValueError('at most 2^31 - 1 faces are supported')


def _to_pixels(verts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """NDC (B, V, 3) -> continuous pixel coordinates where pixel (i, j) has centre (j, i)."""
    px = (verts[..., 0] + 1) * (w / 2) - 0.5
    py = (verts[..., 1] + 1) * (h / 2) - 0.5
    return torch.stack([px, py, verts[..., 2]], dim=-1)


def _corner_coords(pverts: torch.Tensor, faces: torch.Tensor):
    """Corner coordinates of every face: x, y, z, each a tuple over the 3 corners of (B, F)
    arrays (index_select: several times faster than pverts[:, faces])."""
    bsz, nf = pverts.shape[0], faces.shape[0]
    flat_ids = faces.t().reshape(-1)
    return tuple(pverts[..., c].index_select(1, flat_ids).view(bsz, 3, nf).unbind(1) for c in range(3))


def _face_area_valid(x, y, z, cull_backfaces: bool):
    """Twice the signed screen area (B, F) of each face, and whether it is drawn: finite
    corners, nonzero area, and (culling) counter-clockwise on screen (area < 0)."""
    area = (x[1] - x[0]) * (y[2] - y[0]) - (y[1] - y[0]) * (x[2] - x[0])
    valid = area != 0
    for coord in (*x, *y, *z):
        valid &= torch.isfinite(coord)
    if cull_backfaces:
        valid &= area < 0
    return area, valid


def _canonical_edge(xs, ys, ids, k: int):
    """Edge k (opposite corner k, from corner k+1 to corner k+2) as (sx, sy, dx, dy): stored
    from its lower-index vertex (start s, direction d) and negated when that reverses it, so
    that
        w_k(p) = dx * (py - sy) - dy * (px - sx)
    is the signed double area of (corner k+1, corner k+2, p), and a neighbour sharing the
    edge computes bitwise the opposite value (negation is exact in floating point).

    xs, ys: the 3 corners' coordinates; ids: their vertex indices (any matching shapes).
    """
    i, j = (k + 1) % 3, (k + 2) % 3
    swap = ids[i] > ids[j]
    sx, sy = torch.where(swap, xs[j], xs[i]), torch.where(swap, ys[j], ys[i])
    dx, dy = torch.where(swap, xs[i], xs[j]) - sx, torch.where(swap, ys[i], ys[j]) - sy
    return sx, sy, torch.where(swap, -dx, dx), torch.where(swap, -dy, dy)


def _edge_table(tri_xy: torch.Tensor, corner_ids: torch.Tensor) -> torch.Tensor:
    """Canonical edge data (..., 3, 4) = (sx, sy, dx, dy) per edge k (_canonical_edge) of
    triangles with corner positions tri_xy (..., 3, 2) and vertex indices corner_ids (..., 3)."""
    xs, ys, ids = tri_xy[..., 0].unbind(-1), tri_xy[..., 1].unbind(-1), corner_ids.unbind(-1)
    return torch.stack([torch.stack(_canonical_edge(xs, ys, ids, k), dim=-1) for k in range(3)], dim=-2)


def _edge_values(table: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Edge functions (..., 3) at points (px, py) (...,) from an edge table (..., 3, 4)."""
    sx, sy, dx, dy = table.unbind(-1)
    return dx * (py[..., None] - sy) - dy * (px[..., None] - sx)


def _depth(bary: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Screen-space depth (...,) from barycentrics (..., 3) and corner depths (..., 3).

    Written relative to corner 0 so that a face of constant depth gets exactly that depth
    (equal-depth ties are then real ties, broken by face index).
    """
    z0 = z[..., 0]
    return z0 + bary[..., 1] * (z[..., 1] - z0) + bary[..., 2] * (z[..., 2] - z0)


def _ordered_depth_bits(z: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 whose signed order equals the float order (with -0 == +0)."""
    bits = (z.float() + 0.0).view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.to(torch.int64)


def _visible_faces_pytorch(pverts: torch.Tensor, faces: torch.Tensor, h: int, w: int, cull_backfaces: bool) -> torch.Tensor:
    """Reference visibility: (B, H, W) int64 face index or -1.

    Per face, as elementwise operations on (B, F) arrays (one per corner coordinate): the
    area, validity and pixel box. Only the faces whose box holds a pixel centre go on (on a
    head at 128 pixels, fewer than half: culled faces and faces between pixel centres drop
    out), and for them an 18-float table of edge data, fill rule and depth is built; then
    every (face, pixel) candidate is tested and the nearest face per pixel kept.
    """
    bsz, nf = pverts.shape[0], faces.shape[0]
    device = pverts.device
    x, y, z = _corner_coords(pverts, faces)                      # (B, F) per corner
    area, valid = _face_area_valid(x, y, z, cull_backfaces)

    # Inclusive pixel boxes of the pixel centres that may lie inside each face.
    def box(c, size):
        lo = torch.ceil(torch.minimum(torch.minimum(c[0], c[1]), c[2])).clamp(min=0)
        hi = torch.floor(torch.maximum(torch.maximum(c[0], c[1]), c[2])).clamp(max=size - 1)
        n = (hi - lo + 1).clamp(min=0)
        n = torch.where(valid & torch.isfinite(n), n, torch.zeros_like(n))
        return torch.nan_to_num(lo).long().reshape(-1), n.long().reshape(-1)
    x0, nx = box(x, w)
    y0, ny = box(y, h)
    counts = nx * ny                                             # (B*F,)
    live = torch.nonzero(counts > 0).squeeze(1)                  # flat (batch, face) ids with candidates
    if live.numel() == 0:
        return torch.full((bsz, h, w), -1, dtype=torch.int64, device=device)
    counts_live = counts.index_select(0, live)
    ends = torch.cumsum(counts_live, 0)
    total = int(ends[-1])
    # Chunk boundaries: faces [start, stop) with at most _MAX_PAIRS candidates (one face
    # larger than that gets a chunk of its own).
    bounds = [0]
    if total > _MAX_PAIRS:
        marks = torch.arange(_MAX_PAIRS, total, _MAX_PAIRS, device=device)
        cuts = torch.searchsorted(ends, marks, right=True).tolist()
        for c in cuts:
            c = max(c, bounds[-1] + 1)
            if c < len(live) and c > bounds[-1]:
                bounds.append(c)
    bounds.append(len(live))
    bounds = sorted(set(bounds))
    # Candidates per chunk, read in one host sync (not one per chunk).
    if len(bounds) == 2:
        chunk_pairs = [total]
    else:
        at = torch.cat([ends.new_zeros(1), ends])[torch.tensor(bounds, device=device)]
        chunk_pairs = (at[1:] - at[:-1]).tolist()

    # Tables of the live faces, one column each (gathered once per candidate): per edge k
    # (opposite corner k) its canonical start and direction (_canonical_edge) with the winding
    # folded in (w_k >= 0 inside for either winding); whether pixel centres exactly on it
    # belong to this face (the top-left rule: its inward normal sign(area) (-dy, dx), for
    # the edge from corner k+1 to corner k+2, points right, or down when horizontal; a
    # neighbour sharing the edge has the opposite normal, so exactly one of the two owns
    # it); and the depth at corner 0 with its differences to corners 1 and 2.
    face_ids = live % nf
    take = lambda a: a.reshape(-1).index_select(0, live)         # index_select: several times faster than a[live]
    xs, ys, zs = [take(c) for c in x], [take(c) for c in y], [take(c) for c in z]
    sign = torch.sign(take(area))
    ids = faces.t().index_select(1, face_ids)                    # (3, L) vertex indices
    columns = []
    owns = []
    for k in range(3):
        sx, sy, dx, dy = _canonical_edge(xs, ys, ids, k)
        columns += [sx, sy, dx * sign, dy * sign]                # sign = +-1 for live faces: exact
        i, j = (k + 1) % 3, (k + 2) % 3
        normal_x, normal_y = -(ys[j] - ys[i]) * sign, (xs[j] - xs[i]) * sign
        owns.append(((normal_x > 0) | ((normal_x == 0) & (normal_y > 0))).to(sign.dtype))
    # Column tables (one row per quantity): a candidate's values are gathered into
    # contiguous rows, and the elementwise work on them runs vectorised (on a (P, 18)
    # row gather, every column is a strided view, several times slower).
    table = torch.stack(columns + owns + [zs[0], zs[1] - zs[0], zs[2] - zs[0]])                # (18, L)
    batch_pixel0 = torch.div(live, nf, rounding_mode='floor') * (h * w)
    boxes = torch.stack([take(nx), take(x0), take(y0), face_ids, batch_pixel0])                 # (5, L) int64

    keys = torch.full((bsz * h * w,), _EMPTY_KEY, dtype=torch.int64, device=device)
    for start, stop, num_pairs in zip(bounds[:-1], bounds[1:], chunk_pairs):
        cnt = counts_live[start:stop]
        rows = torch.arange(start, stop, device=device)
        pair_row = torch.repeat_interleave(rows, cnt, output_size=num_pairs)   # output_size: no host sync
        first = torch.cumsum(cnt, 0) - cnt
        local = torch.arange(num_pairs, device=device) - torch.repeat_interleave(first, cnt, output_size=num_pairs)
        box_w, box_x0, box_y0, face_id, pixel0 = boxes.index_select(1, pair_row)
        t = table.index_select(1, pair_row)                      # (18, P)
        row = torch.div(local, box_w, rounding_mode='floor')
        pix_x = box_x0 + (local - row * box_w)
        pix_y = box_y0 + row
        px, py = pix_x.to(t.dtype), pix_y.to(t.dtype)
        # Edge functions as _edge_values, and the fill rule for pixel centres on an edge.
        wk = [t[4 * k + 2] * (py - t[4 * k + 1]) - t[4 * k + 3] * (px - t[4 * k]) for k in range(3)]
        inside = None
        for k in range(3):
            inside_k = (wk[k] > 0) | ((wk[k] == 0) & (t[12 + k] > 0))
            inside = inside_k if inside is None else inside & inside_k
        wsum = wk[0] + wk[1] + wk[2]
        depth = t[15] + (wk[1] * t[16] + wk[2] * t[17]) / wsum
        key = (_ordered_depth_bits(depth) << 32) | face_id
        key = torch.where(inside, key, torch.full_like(key, _EMPTY_KEY))
        keys.scatter_reduce_(0, pixel0 + pix_y * w + pix_x, key, reduce='amin', include_self=True)

    face = torch.where(keys == _EMPTY_KEY, torch.full_like(keys, -1), keys & 0xFFFFFFFF)
    return face.reshape(bsz, h, w)


def _unshared_corners(points: torch.Tensor, faces: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Every face's own copy of its corners, (B, 3F, C), for an external rasterizer.

    points (B, V, C), faces (F, 3), valid (B, F) bool, hidden (C,): the corners of faces that
    are not valid in a sample (culled, zero area, non-finite) all become the point `hidden`,
    which the rasterizer must not draw (zero area, outside its depth range). Face f of every
    sample is then triangle f of the shared index list arange(3F).view(F, 3): one call draws
    the batch, each sample with its own culling, and the ids need no mapping back.
    """
    corners = points[:, faces]                                   # (B, F, 3, C)
    corners = torch.where(valid[..., None, None], corners, hidden.to(corners.dtype))
    return corners.reshape(points.shape[0], -1, points.shape[-1])


def _shared_triangles(num_faces: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(F, 3) corner indices into `_unshared_corners`' (B, 3F, C): triangle f is corners 3f, 3f + 1, 3f + 2."""
    return torch.arange(3 * num_faces, dtype=dtype, device=device).view(num_faces, 3)


def _finite_range(z: torch.Tensor):
    """Per-sample min and max (B, 1) of the finite values of z (B, V), without a host sync."""
    finite = torch.isfinite(z)
    zmin = torch.where(finite, z, torch.full_like(z, float('inf'))).amin(dim=1, keepdim=True)
    zmax = torch.where(finite, z, torch.full_like(z, float('-inf'))).amax(dim=1, keepdim=True)
    return zmin, zmax


_NVDIFFRAST_CONTEXTS = {}   # device -> RasterizeCudaContext (creating one per call is slow)
NVDIFFRAST_SIZE_MULTIPLE = 8    # nvdiffrast's CUDA rasterizer before 0.3.2 takes only multiples of 8


def _visible_faces_nvdiffrast(pverts: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor, h: int, w: int, cull_backfaces: bool) -> torch.Tensor:
    """nvdiffrast picks the visible face: one instanced call for the batch (CUDA only; unverified here).

    The image is padded at the bottom and right to multiples of 8 (the fading raw
    resolution of mesh_depth_err is e.g. 77) and cropped back.
    """
    import nvdiffrast.torch as dr   # optional dependency
    bsz, nf = verts.shape[0], faces.shape[0]
    if nf == 0:
        return torch.full((bsz, h, w), -1, dtype=torch.int64, device=verts.device)
    _, valid = _face_area_valid(*_corner_coords(pverts, faces), cull_backfaces)
    ctx = _NVDIFFRAST_CONTEXTS.get(verts.device)
    if ctx is None:
        ctx = _NVDIFFRAST_CONTEXTS[verts.device] = dr.RasterizeCudaContext(device=verts.device)
    m = NVDIFFRAST_SIZE_MULTIPLE
    ph, pw = -(-h // m) * m, -(-w // m) * m
    # nvdiffrast's row 0 is clip y = -1, our top row, so x and y pass through unchanged, only
    # rescaled when padding (pixel centres (2j + 1) / w - 1 -> (2j + 1) / pw - 1). Its depth
    # test keeps the smallest z/w in [-1, 1]: each sample's depths are mapped into [-0.9, 0.9].
    x, y, z = verts.unbind(-1)
    if pw != w:
        x = (x + 1) * (w / pw) - 1
    if ph != h:
        y = (y + 1) * (h / ph) - 1
    zmin, zmax = _finite_range(z)
    zc = (z - zmin) / (zmax - zmin).clamp(min=1e-12) * 1.8 - 0.9
    pos = torch.stack([x, y, zc, torch.ones_like(zc)], dim=-1)
    hidden = torch.tensor([0.0, 0.0, 2.0, 1.0], device=verts.device)      # beyond the far plane
    pos = _unshared_corners(pos, faces, valid, hidden).float().contiguous()
    tri = _shared_triangles(nf, verts.device, torch.int32)
    rast, _ = dr.rasterize(ctx, pos, tri, resolution=[ph, pw])
    return rast[:, :h, :w, 3].round().long() - 1                # triangle id + 1; 0 = empty


def _visible_faces_pytorch3d(pverts: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor, h: int, w: int, cull_backfaces: bool) -> torch.Tensor:
    """pytorch3d picks the visible face: one call for the batch as a padded Meshes (unverified here)."""
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes   # optional dependency
    from pytorch3d.structures import Meshes
    bsz, nf = verts.shape[0], faces.shape[0]
    if nf == 0:
        return torch.full((bsz, h, w), -1, dtype=torch.int64, device=verts.device)
    _, valid = _face_area_valid(*_corner_coords(pverts, faces), cull_backfaces)
    # pytorch3d's NDC has +x left and +y up, the shorter image side spanning [-1, 1], and
    # only draws z > 0.
    v = verts.float()
    zmin, _ = _finite_range(v[..., 2])
    p3 = torch.stack([-v[..., 0] * max(w / h, 1.0), -v[..., 1] * max(h / w, 1.0), v[..., 2] - zmin + 1.0], dim=-1)
    hidden = torch.tensor([0.0, 0.0, -1.0], device=verts.device)          # behind the camera
    p3 = _unshared_corners(p3, faces, valid, hidden)
    tri = _shared_triangles(nf, verts.device, torch.int64).expand(bsz, -1, -1).contiguous()
    p2f, _, _, _ = rasterize_meshes(Meshes(verts=p3, faces=tri), image_size=(h, w), blur_radius=0.0,
                                    faces_per_pixel=1, perspective_correct=False, cull_backfaces=False)
    p2f = p2f[..., 0]                                            # packed ids: b * F + f
    offset = (torch.arange(bsz, device=verts.device) * nf).view(-1, 1, 1)
    return torch.where(p2f >= 0, p2f - offset, torch.full_like(p2f, -1))


PYTORCH3D_AREA_EPSILON = 1e-8    # pytorch3d's kEpsilon, added to twice the face area in its NDC units


def _pytorch3d_bary(verts: torch.Tensor, tri_ids: torch.Tensor, b: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor,
                    h: int, w: int) -> torch.Tensor:
    """(P, 3) barycentrics of pixels (row ii, column jj) in the faces tri_ids (P, 3) of batch
    items b, with pytorch3d's operations and rounding (module docstring)."""
    short = min(h, w)
    tri = verts[b[:, None], tri_ids]                             # (P, 3, 3) NDC, verts' dtype
    x, y = (tri[..., 0] * (w / short)).unbind(-1), (tri[..., 1] * (h / short)).unbind(-1)
    # Pixel centres as pytorch3d makes them: exact (float64), then the working dtype.
    px = ((2 * jj.double() + 1 - w) / short).to(verts.dtype)
    py = ((2 * ii.double() + 1 - h) / short).to(verts.dtype)

    def edge(p_x, p_y, k, l):                                    # pytorch3d's edge_function(p, v_k, v_l)
        return (p_x - x[k]) * (y[l] - y[k]) - (p_y - y[k]) * (x[l] - x[k])
    area = edge(x[2], y[2], 0, 1) + PYTORCH3D_AREA_EPSILON
    return torch.stack([edge(px, py, 1, 2) / area, edge(px, py, 2, 0) / area, edge(px, py, 0, 1) / area], dim=-1)


def _fragments_from_faces(verts: torch.Tensor, faces: torch.Tensor, pix_to_face: torch.Tensor,
                          pytorch3d_bary: bool) -> Fragments:
    """Barycentrics and depth of the chosen faces, differentiable w.r.t. the vertices (NDC).

    Uses the same edge functions as the coverage test, evaluated only at covered pixels,
    in float64 (see the module docstring); returned in the vertices' dtype.
    """
    bsz, h, w = pix_to_face.shape
    work = torch.promote_types(verts.dtype, torch.float64)
    pverts = _to_pixels(verts.to(work), h, w)
    flat = pix_to_face.reshape(-1)
    pix = torch.nonzero(flat >= 0).squeeze(1)                    # covered pixels
    f = flat.index_select(0, pix)
    b = torch.div(pix, h * w, rounding_mode='floor')
    jj = (pix % w).to(work)
    ii = torch.div(pix % (h * w), w, rounding_mode='floor').to(work)
    corners = faces.index_select(0, f)                           # (P, 3)
    rows = (b[:, None] * pverts.shape[1] + corners).reshape(-1)  # row gathers: faster than pverts[b, corners]
    tri = pverts.reshape(-1, 3).index_select(0, rows).view(-1, 3, 3)                                 # (P, 3, 3)
    wk = _edge_values(_edge_table(tri[..., :2], corners), jj, ii)
    bary_c = wk / wk.sum(dim=-1, keepdim=True)
    depth_c = _depth(bary_c, tri[..., 2])
    if pytorch3d_bary:
        bary_c = _pytorch3d_bary(verts, corners, b, ii, jj, h, w)
    bary = verts.new_zeros(bsz * h * w, 3).index_put((pix,), bary_c.to(verts.dtype))
    depth = verts.new_full((bsz * h * w,), float('inf')).index_put((pix,), depth_c.to(verts.dtype))
    return Fragments(pix_to_face, bary.reshape(bsz, h, w, 3), depth.reshape(bsz, h, w))


BACKENDS = ('pytorch', 'nvdiffrast', 'pytorch3d')
BACKEND_ENV = 'NEXT3D_RASTERIZER'


def auto_backend(verts: torch.Tensor) -> str:
    """The backend that backend='auto' runs: ours, unless NEXT3D_RASTERIZER opts CUDA tensors
    into an optional backend (one of BACKENDS; checked on every device)."""
    return dnnlib.util.optional_backend(BACKEND_ENV, BACKENDS, 'mesh rasterizer', verts.is_cuda)


# Eager under torch.compile: the candidate lists and the covered pixels are sized by the
# mesh, so a compiled graph would be recompiled for every new mesh.
@torch.compiler.disable
def rasterize(verts: torch.Tensor, faces: torch.Tensor, image_size: Union[int, Tuple[int, int]], *,
              cull_backfaces: bool = True, backend: str = 'auto', pytorch3d_bary: bool = False) -> Fragments:
    """Rasterize a batch of meshes that share one topology.

    Args:
        verts:          (B, V, 3) float, NDC (x right, y down, z depth; see module docstring).
        faces:          (F, 3) int64 vertex indices shared by the batch.
        image_size:     int or (H, W).
        cull_backfaces: drop faces whose screen winding is clockwise (normal z >= 0).
        backend:        'auto' | 'pytorch' | 'nvdiffrast' | 'pytorch3d'. 'auto' is
                        ours ('pytorch'); on CUDA tensors the backend named by the
                        environment variable NEXT3D_RASTERIZER, if set (`auto_backend`).
        pytorch3d_bary: barycentrics with pytorch3d's arithmetic (module docstring);
                        False: exact (float64), summing to 1.
    Returns:
        Fragments(pix_to_face (B, H, W) int64, bary (B, H, W, 3), depth (B, H, W)).
        bary and depth are differentiable functions of `verts`; pix_to_face is not.
    """
    _check_inputs(verts, faces)
    h, w = _image_hw(image_size)
    faces = faces.to(device=verts.device, dtype=torch.int64)
    if backend == 'auto':
        backend = auto_backend(verts)
    pverts = _to_pixels(verts, h, w)
    with torch.no_grad():
        if backend == 'pytorch':
            pix_to_face = _visible_faces_pytorch(pverts.detach(), faces, h, w, cull_backfaces)
        elif backend == 'nvdiffrast':
            pix_to_face = _visible_faces_nvdiffrast(pverts.detach(), verts.detach(), faces, h, w, cull_backfaces)
        elif backend == 'pytorch3d':
            pix_to_face = _visible_faces_pytorch3d(pverts.detach(), verts.detach(), faces, h, w, cull_backfaces)
        else:
            raise ValueError(f"unknown rasterizer backend '{backend}' (expected auto, pytorch, nvdiffrast or pytorch3d)")
    return _fragments_from_faces(verts, faces, pix_to_face, pytorch3d_bary)


def project_perspective(points_world: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """World points (B, N, 3) -> NDC (B, N, 3) of the camera in label `c` (B, 25+).

    OpenCV pinhole with intrinsics normalised by the image size: u = fx X / Z + cx in
    [0, 1] across the image, NDC x = 2u - 1 (same for y/rows); z = camera-space depth Z
    (world units). Points behind the camera (Z <= 0) are returned as they are: callers
    must keep meshes in front of the camera (the rasterizer does no clipping).
    """
    if points_world.ndim != 3 or points_world.shape[-1] != 3:
        raise ValueError(f'points_world must be (B, N, 3), got {tuple(points_world.shape)}')
    if c.ndim != 2 or c.shape[1] < 25 or c.shape[0] != points_world.shape[0]:
        raise ValueError(f'c must be (B, 25+) with B = {points_world.shape[0]}, got {tuple(c.shape)}')
    cam2world, intr = coords.split_label(c.to(points_world.dtype))
    rot, origin = cam2world[:, :3, :3], cam2world[:, :3, 3]
    cam = (points_world - origin[:, None]) @ rot                 # R^T (p - o), row vectors
    z = cam[..., 2]
    u = intr[:, None, 0, 0] * cam[..., 0] / z + intr[:, None, 0, 1] * cam[..., 1] / z + intr[:, None, 0, 2]
    v = intr[:, None, 1, 1] * cam[..., 1] / z + intr[:, None, 1, 2]
    return torch.stack([2 * u - 1, 2 * v - 1, z], dim=-1)


def perspective_correct_bary(fragments: Fragments, verts: torch.Tensor, faces: torch.Tensor) -> Fragments:
    """Fragments whose barycentrics are corrected for perspective: b_i / z_i, renormalised.

    verts: (B, V, 3) NDC with z = camera depth (`project_perspective`); faces (F, 3).
    Depth stays the screen-space interpolated z. Empty pixels keep bary = 0.
    """
    p2f, bary = fragments.pix_to_face, fragments.bary
    covered = (p2f >= 0)[..., None]
    bidx = torch.arange(p2f.shape[0], device=p2f.device).view(-1, 1, 1, 1)
    zc = verts[..., 2][bidx, faces.to(p2f.device)[p2f.clamp(min=0)]]          # (B, H, W, 3)
    bz = bary / torch.where(covered, zc, torch.ones_like(zc))
    total = bz.sum(-1, keepdim=True)
    bz = bz / torch.where(covered, total, torch.ones_like(total))
    return Fragments(p2f, bz, fragments.depth)


def interpolate(attrs: torch.Tensor, fragments: Fragments, faces: torch.Tensor = None, *,
                perspective_correct: bool = False, verts: torch.Tensor = None) -> torch.Tensor:
    """Interpolate attributes over the visible faces -> (B, C, H, W); 0 where empty.

    attrs: per-vertex (B, V, C) when `faces` (F, 3) is given; otherwise per-face-corner
           (B, F, 3, C) or (F, 3, C) shared by the batch (e.g. per-face UVs).
    perspective_correct: weight the screen-space barycentrics by 1 / depth of each corner
           (needs `verts` (B, V, 3) in NDC with z = camera depth, as `project_perspective`
           returns, and `faces`). Correct for pinhole projection; leave False for the
           orthographic views.
    """
    p2f, bary = fragments.pix_to_face, fragments.bary
    bsz, h, w = p2f.shape
    covered = p2f >= 0
    f = p2f.clamp(min=0)
    bidx = torch.arange(bsz, device=f.device).view(bsz, 1, 1)
    if perspective_correct:
        if verts is None or faces is None:
            raise ValueError('perspective_correct=True needs verts (B, V, 3) and faces (F, 3)')
        bary = perspective_correct_bary(fragments, verts, faces).bary
    if attrs.ndim == 3 and faces is not None:
        if attrs.shape[0] != bsz:
            raise ValueError(f'per-vertex attrs must be (B={bsz}, V, C), got {tuple(attrs.shape)}')
        corner = attrs[bidx[..., None], faces.to(f.device)[f]]             # (B, H, W, 3, C)
    elif attrs.ndim == 4:
        if attrs.shape[0] != bsz or attrs.shape[2] != 3:
            raise ValueError(f'per-corner attrs must be (B={bsz}, F, 3, C), got {tuple(attrs.shape)}')
        corner = attrs[bidx, f]
    elif attrs.ndim == 3 and attrs.shape[1] == 3:
        corner = attrs[f]
    else:
        raise ValueError(f'attrs must be (B, V, C) with faces, (B, F, 3, C) or (F, 3, C); got {tuple(attrs.shape)}')
    out = (bary[..., None].to(corner.dtype) * corner).sum(-2)
    out = torch.where(covered[..., None], out, torch.zeros_like(out))
    return out.permute(0, 3, 1, 2)
