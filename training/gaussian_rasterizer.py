"""Differentiable 3D Gaussian splatting in plain PyTorch (EWA splatting, tiles, front to back).

A batch of scenes, one camera each, every Gaussian given by its world centre, world
covariance, opacity and a feature vector (RGB or any number of channels):

  1. Projection (`project_gaussians`) with the OpenCV camera of the label `c` (25 floats:
     cam2world 4x4 + intrinsics normalised by the image size, see training/coords.py):
     pixel (x, y) = (fx X / Z + s Y / Z + cx, fy Y / Z + cy) * (W, H), so pixel (i, j)
     has its centre at (j + 0.5, i + 0.5). The 2D covariance is EWA's first-order
     approximation J W Sigma W^T J^T (W the world-to-camera rotation, J the projection's
     Jacobian at the centre) plus EPS2D pixels^2 on the diagonal (a low-pass filter so
     that no splat is thinner than a pixel). Gaussians with Z <= near_plane are culled.
  2. Per pixel, Gaussian i has alpha_i = min(ALPHA_MAX, o_i exp(-d^T Conic_i d / 2)),
     set to 0 below ALPHA_MIN (1/255); Gaussians are composited front to back in the order
     of their centres' camera Z (ties: lower index first): weight w_i = alpha_i T_i with
     T_i = prod_{j<i} (1 - alpha_j), and compositing stops for good before the Gaussian that
     would bring T below TRANSMITTANCE_MIN (it and all later ones get weight 0).
     features = sum_i w_i f_i + (1 - sum_i w_i) background; alpha = sum_i w_i;
     depth = sum_i w_i Z_i (accumulated camera Z, not normalised by alpha).
  3. Tiles: a Gaussian touches only the 8 x 8 tiles that its footprint overlaps. The
     footprint radius is where alpha falls to ALPHA_MIN, sqrt(2 ln(255 o) lambda_max)
     (lambda_max the 2D covariance's larger eigenvalue), so the tiled result equals the
     brute-force evaluation of every Gaussian at every pixel (`render_gaussians_bruteforce`,
     the reference the tests compare with) up to rounding.

These are the rules of 3DGS and gsplat (alpha_max 0.999, 1/255, 1e-4, eps2d 0.3,
'classic' mode), so the optional `gsplat` CUDA backend computes the same images.
Gradients reach every input (centres, covariances, opacities, features, background)
through autograd; the sort order and the tile lists are piecewise constant.

Backends: 'pytorch' (this file; CPU and GPU, memory ~ pixels x Gaussians per tile) and
'gsplat' (CUDA only, when the package is installed). gsplat has never run in this
repository (no GPU here; its glue is tested with a stand-in module), so, as the mesh
rasterizer's optional backends, it is opt-in: 'auto' is ours, unless the environment
variable NEXT3D_GAUSSIAN_RASTERIZER=gsplat asks for gsplat on CUDA tensors.
"""

import bisect
import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import misc
from training import coords

ALPHA_MIN = 1.0 / 255          # contributions below this are skipped
ALPHA_MAX = 0.999              # no single Gaussian is fully opaque (keeps 1 - alpha > 0)
TRANSMITTANCE_MIN = 1e-4       # compositing stops before transmittance falls below this
EPS2D = 0.3                    # pixels^2 added to the 2D covariance's diagonal
NEAR_PLANE = 0.01              # world units: centres closer to the camera are culled
TILE_SIZE = 8                  # pixels; 8 x 8 tiles waste fewer evaluations than 16 x 16 here (2x faster on a CPU)
BACKENDS = ('auto', 'pytorch', 'gsplat')
BACKEND_ENV = 'NEXT3D_GAUSSIAN_RASTERIZER'   # what 'auto' runs on CUDA tensors: pytorch (default) or gsplat
_PAIRS_PER_CHUNK = 1 << 22     # (tile, pixel, Gaussian) triples evaluated at once, at most
_GAUSSIANS_PER_CHUNK = 32      # Gaussians per tile in one step (tiles with fewer drop out sooner)


class Projected(NamedTuple):
    """Gaussians projected into one camera per batch item (pixels; see the module docstring).

    means2d: (B, N, 2) centre (x = column, y = row), pixel centres at j + 0.5.
    conics:  (B, N, 3) (a, b, c) of the inverse 2D covariance [[a, b], [b, c]].
    depths:  (B, N) camera Z of the centre (world units).
    radii:   (B, N) footprint radius in pixels (where alpha reaches ALPHA_MIN); 0 if culled.
    """
    means2d: torch.Tensor
    conics: torch.Tensor
    depths: torch.Tensor
    radii: torch.Tensor


class Rendered(NamedTuple):
    """features (B, C, H, W) composited over the background; alpha (B, 1, H, W) = sum of
    weights; depth (B, 1, H, W) = sum of weights x camera Z (world units, not normalised)."""
    features: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor


def quaternion_to_matrix(quats: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z), any norm (normalised here) -> (..., 3, 3) rotations."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).unflatten(-1, (3, 3))


def covariance_from_scale_rotation(scales: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Sigma = R diag(scales^2) R^T.

    scales: (..., 3) standard deviations along the Gaussian's own axes (world units);
    rotations: (..., 3, 3) matrices, or (..., 4) quaternions (w, x, y, z).
    Returns (..., 3, 3).
    """
    rot = quaternion_to_matrix(rotations) if rotations.shape[-1] == 4 else rotations
    m = rot * scales.unsqueeze(-2)                        # R diag(s)
    return m @ m.transpose(-1, -2)


def _image_hw(image_size) -> Tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(s) for s in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f'image_size must be positive, got {image_size}')
    return h, w


def _check_inputs(means, covariances, opacities, features, c):
    misc.assert_shape(means, [None, None, 3], 'means')
    b, n = means.shape[:2]
    misc.assert_shape(covariances, [b, n, 3, 3], 'covariances')
    misc.assert_shape(opacities, [b, n], 'opacities')
    misc.assert_shape(features, [b, n, None], 'features')
    misc.assert_shape(c, [b, None], 'c')
    if c.shape[1] < 25:
        raise ValueError(f'c: the camera label needs 25 values (4x4 cam2world + 3x3 intrinsics), got {c.shape[1]}')


def pixel_intrinsics(c: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 25+) labels -> (B, 3, 3) intrinsics in pixels (rows scaled by W, H)."""
    _, intr = coords.split_label(c)
    scale = intr.new_tensor([width, height, 1.0])
    return intr * scale[:, None]


def project_gaussians(means: torch.Tensor, covariances: torch.Tensor, opacities: torch.Tensor, c: torch.Tensor,
                      height: int, width: int, eps2d: float = EPS2D, near_plane: float = NEAR_PLANE) -> Projected:
    """EWA projection of (B, N) Gaussians into the cameras of `c` (B, 25+); see `Projected`."""
    cam2world, _ = coords.split_label(c.to(means.dtype))
    k = pixel_intrinsics(c.to(means.dtype), height, width)
    rot, origin = cam2world[:, :3, :3], cam2world[:, :3, 3]
    cam = (means - origin[:, None]) @ rot                                   # R^T (p - o), (B, N, 3)
    x, y, z = cam.unbind(-1)
    visible = z > near_plane
    z = torch.where(visible, z, torch.ones_like(z))                          # culled: any finite value
    fx, skew, cx = k[:, 0, 0, None], k[:, 0, 1, None], k[:, 0, 2, None]
    fy, cy = k[:, 1, 1, None], k[:, 1, 2, None]
    means2d = torch.stack([(fx * x + skew * y) / z + cx, fy * y / z + cy], dim=-1)
    zero = torch.zeros_like(z)
    jac = torch.stack([fx / z, skew / z, -(fx * x + skew * y) / (z * z),
                       zero, fy / z, -fy * y / (z * z)], dim=-1).unflatten(-1, (2, 3))   # (B, N, 2, 3)
    cov_cam = rot.transpose(1, 2)[:, None] @ covariances @ rot[:, None]     # W Sigma W^T
    cov2d = jac @ cov_cam @ jac.transpose(-1, -2)
    a = cov2d[..., 0, 0] + eps2d
    b = cov2d[..., 0, 1]
    d = cov2d[..., 1, 1] + eps2d
    det = a * d - b * b
    conics = torch.stack([d / det, -b / det, a / det], dim=-1)
    with torch.no_grad():
        mid = (a + d) / 2
        lambda_max = mid + torch.sqrt((mid * mid - det).clamp(min=0))
        reach = 2 * torch.log((opacities.detach() / ALPHA_MIN).clamp(min=1))   # alpha >= ALPHA_MIN inside d^T C d <= reach
        radii = torch.sqrt(reach * lambda_max)
        radii = torch.where(visible & (det > 0) & (reach > 0), radii, torch.zeros_like(radii))
    return Projected(means2d, conics, torch.where(visible, cam[..., 2], z), radii)


def _alphas(d: torch.Tensor, conics: torch.Tensor, opacities: torch.Tensor) -> torch.Tensor:
    """Alpha of Gaussians at offsets d (..., 2) = pixel - centre, conics (..., 3), opacities (...)."""
    dx, dy = d.unbind(-1)
    ca, cb, cc = conics.unbind(-1)
    power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
    alpha = torch.clamp(opacities * torch.exp(power.clamp(max=0)), max=ALPHA_MAX)
    return torch.where((alpha >= ALPHA_MIN) & (power <= 0), alpha, torch.zeros_like(alpha))


def _composite(alpha: torch.Tensor, values: torch.Tensor, trans: torch.Tensor, done: torch.Tensor):
    """One front-to-back step over K depth-ordered Gaussians, continuing from a previous one.

    alpha (..., P, K) per pixel and Gaussian; values (..., K, C); trans (..., P) the
    transmittance so far; done (..., P) bool, compositing stopped. Returns the weighted sum
    (..., P, C) and the new (trans, done).
    """
    after = trans.unsqueeze(-1) * torch.cumprod(1 - alpha, dim=-1)          # T after each Gaussian
    before = torch.cat([trans.unsqueeze(-1), after[..., :-1]], dim=-1)
    keep = (after >= TRANSMITTANCE_MIN) & ~done.unsqueeze(-1)               # a prefix: `after` only falls
    weights = torch.where(keep, alpha * before, torch.zeros_like(alpha))
    trans = trans - weights.sum(-1)
    done = done | (after[..., -1] < TRANSMITTANCE_MIN)
    return weights @ values, trans, done


def render_gaussians_bruteforce(means, covariances, opacities, features, c, image_size, background=None,
                                eps2d: float = EPS2D, near_plane: float = NEAR_PLANE) -> Rendered:
    """The reference: every Gaussian evaluated at every pixel, sorted by depth, composited.
    Same arguments and result as `rasterize_gaussians`; memory B x H x W x N."""
    _check_inputs(means, covariances, opacities, features, c)
    h, w = _image_hw(image_size)
    proj = project_gaussians(means, covariances, opacities, c, h, w, eps2d, near_plane)
    depth_key = torch.where(proj.radii > 0, proj.depths, torch.full_like(proj.depths, math.inf))
    order = torch.sort(depth_key, dim=1, stable=True).indices
    take = lambda t: torch.gather(t, 1, order.view(*order.shape, *([1] * (t.ndim - 2))).expand(*order.shape, *t.shape[2:]))
    m2, con, op, z = take(proj.means2d), take(proj.conics), take(opacities), take(proj.depths)
    op = torch.where(take(proj.radii) > 0, op, torch.zeros_like(op))
    values = torch.cat([take(features), z.unsqueeze(-1)], dim=-1)           # (B, N, C + 1)
    pix = _pixel_centres(h, w, means.dtype, means.device).reshape(1, h * w, 1, 2)
    alpha = _alphas(pix - m2[:, None], con[:, None], op[:, None])           # (B, HW, N)
    trans = alpha.new_ones(alpha.shape[:2])
    acc, trans, _ = _composite(alpha, values, trans, torch.zeros_like(trans, dtype=torch.bool))
    return _finish(acc, trans, h, w, background)


def _pixel_centres(h: int, w: int, dtype, device) -> torch.Tensor:
    """(H, W, 2) pixel centres (x, y) = (j + 0.5, i + 0.5)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device) + 0.5,
                            torch.arange(w, dtype=dtype, device=device) + 0.5, indexing='ij')
    return torch.stack([xs, ys], dim=-1)


def _finish(acc: torch.Tensor, trans: torch.Tensor, h: int, w: int, background) -> Rendered:
    """acc (B, HW, C + 1) weighted features and depth, trans (B, HW) -> Rendered."""
    acc = acc.transpose(1, 2).reshape(acc.shape[0], acc.shape[2], h, w)
    alpha = (1 - trans).reshape(-1, 1, h, w)
    feats = acc[:, :-1]
    if background is not None:
        bg = background if background.ndim == 4 else background.reshape(*background.shape, 1, 1)
        feats = feats + (1 - alpha) * bg
    return Rendered(feats, alpha, acc[:, -1:])


def _tile_lists(proj: Projected, h: int, w: int, tile: int):
    """Depth-sorted Gaussian lists of the non-empty tiles.

    Returns (table (T, K) int64 flat Gaussian index b * N + i or -1, tiles (T,) int64 flat
    tile index (b * tiles_y + row) * tiles_x + column), with T the non-empty tiles of the
    batch and K the most Gaussians on one tile; each row lists its Gaussians front to back.
    """
    bsz, n = proj.depths.shape
    device = proj.depths.device
    ntx, nty = -(-w // tile), -(-h // tile)
    radii, m2 = proj.radii.detach(), proj.means2d.detach()
    live = radii > 0
    x0 = torch.floor((m2[..., 0] - radii) / tile).clamp(min=0)
    x1 = torch.floor((m2[..., 0] + radii) / tile).clamp(max=ntx - 1)
    y0 = torch.floor((m2[..., 1] - radii) / tile).clamp(min=0)
    y1 = torch.floor((m2[..., 1] + radii) / tile).clamp(max=nty - 1)
    nx = torch.where(live, x1 - x0 + 1, torch.zeros_like(x0)).clamp(min=0).long()
    ny = torch.where(live, y1 - y0 + 1, torch.zeros_like(y0)).clamp(min=0).long()
    # Gaussians in depth order (culled last), so that pairs come out sorted by depth.
    key = torch.where(live, proj.depths.detach(), torch.full_like(proj.depths, math.inf))
    order = (torch.sort(key, dim=1, stable=True).indices + torch.arange(bsz, device=device)[:, None] * n).reshape(-1)
    counts = (nx * ny).reshape(-1)[order]
    total = int(counts.sum())
    if total == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty.view(0, 0), empty
    gid = torch.repeat_interleave(order, counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=device) - torch.repeat_interleave(first, counts, output_size=total)
    gnx = nx.reshape(-1)[gid]
    tx = x0.reshape(-1)[gid].long() + local % gnx
    ty = y0.reshape(-1)[gid].long() + torch.div(local, gnx, rounding_mode='floor')
    tile_id = (torch.div(gid, n, rounding_mode='floor') * nty + ty) * ntx + tx
    tile_id, perm = torch.sort(tile_id, stable=True)                        # stable: depth order within a tile
    gid = gid[perm]
    tiles, per_tile = torch.unique_consecutive(tile_id, return_counts=True)
    start = torch.cumsum(per_tile, 0) - per_tile
    row = torch.repeat_interleave(torch.arange(len(tiles), device=device), per_tile, output_size=total)
    slot = torch.arange(total, device=device) - start[row]
    table = torch.full((len(tiles), int(per_tile.max())), -1, dtype=torch.int64, device=device)
    table[row, slot] = gid
    longest_first = torch.sort(per_tile, descending=True, stable=True).indices
    return table[longest_first], tiles[longest_first]


def _rasterize_pytorch(proj: Projected, opacities, features, h: int, w: int, tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tiled compositing -> (acc (B, HW, C + 1), trans (B, HW))."""
    bsz, n = proj.depths.shape
    table, tiles = _tile_lists(proj, h, w, tile)
    values = torch.cat([features, proj.depths.unsqueeze(-1)], dim=-1).reshape(bsz * n, -1)
    op = torch.where(proj.radii > 0, opacities, torch.zeros_like(opacities)).reshape(-1)
    m2, con = proj.means2d.reshape(-1, 2), proj.conics.reshape(-1, 3)
    ntx, nty = -(-w // tile), -(-h // tile)
    acc = values.new_zeros(bsz * nty * ntx, tile * tile, values.shape[-1])
    trans_out = values.new_ones(bsz * nty * ntx, tile * tile)
    if len(table) > 0:
        tile_xy = torch.stack([tiles % ntx, torch.div(tiles, ntx, rounding_mode='floor') % nty], dim=-1)
        local = _pixel_centres(tile, tile, values.dtype, values.device).reshape(1, tile * tile, 2)
        pix = local + (tile_xy * tile).to(values.dtype)[:, None]           # (T, P, 2)
        # Rows are sorted by length: chunk k0 only involves the tiles with more than k0 Gaussians.
        lengths = (table >= 0).sum(1).tolist()
        k_chunk = max(1, min(_GAUSSIANS_PER_CHUNK, _PAIRS_PER_CHUNK // (len(table) * tile * tile)))
        tile_acc = values.new_zeros(len(table), tile * tile, values.shape[-1])
        trans = values.new_ones(len(table), tile * tile)
        done = torch.zeros_like(trans, dtype=torch.bool)
        for k0 in range(0, table.shape[1], k_chunk):
            active = bisect.bisect_left([-x for x in lengths], -k0)        # tiles with length > k0
            idx = table[:active, k0:k0 + k_chunk]
            present = idx >= 0
            g = idx.clamp(min=0)
            alpha = _alphas(pix[:active, :, None] - m2[g][:, None], con[g][:, None],
                            torch.where(present, op[g], torch.zeros_like(op[g]))[:, None])   # (active, P, k)
            part, trans_a, done_a = _composite(alpha, values[g], trans[:active], done[:active])
            tile_acc = tile_acc + F.pad(part, (0, 0, 0, 0, 0, len(table) - active))
            trans = torch.cat([trans_a, trans[active:]])
            done = torch.cat([done_a, done[active:]])
        acc = acc.index_copy(0, tiles, tile_acc)
        trans_out = trans_out.index_copy(0, tiles, trans)
    # (B, nty, ntx, ty, tx, C) -> (B, H, W, C), cropped to the image.
    acc = acc.reshape(bsz, nty, ntx, tile, tile, -1).permute(0, 1, 3, 2, 4, 5).reshape(bsz, nty * tile, ntx * tile, -1)
    trans_out = trans_out.reshape(bsz, nty, ntx, tile, tile).permute(0, 1, 3, 2, 4).reshape(bsz, nty * tile, ntx * tile)
    return acc[:, :h, :w].reshape(bsz, h * w, -1), trans_out[:, :h, :w].reshape(bsz, h * w)


def _rasterize_gsplat(means, covariances, opacities, features, c, h: int, w: int, eps2d: float, near_plane: float):
    """gsplat's CUDA rasterizer, one camera per scene -> (acc (B, HW, C + 1), trans (B, HW))."""
    import gsplat   # optional dependency
    cam2world, _ = coords.split_label(c.to(means.dtype))
    viewmats = torch.linalg.inv(cam2world)
    ks = pixel_intrinsics(c.to(means.dtype), h, w)
    outs, transes = [], []
    for b in range(means.shape[0]):
        colors, alphas, _ = gsplat.rasterization(
            means[b], None, None, opacities[b], features[b], viewmats[b:b + 1], ks[b:b + 1], w, h,
            near_plane=near_plane, eps2d=eps2d, packed=False, render_mode='RGB+D',
            rasterize_mode='classic', covars=covariances[b])
        outs.append(colors[0].reshape(h * w, -1))
        transes.append(1 - alphas[0].reshape(h * w))
    return torch.stack(outs), torch.stack(transes)


def gsplat_available() -> bool:
    try:
        import gsplat  # noqa: F401
        return True
    except ImportError:
        return False


def auto_backend(means: torch.Tensor) -> str:
    """The backend that backend='auto' runs: ours, unless NEXT3D_GAUSSIAN_RASTERIZER=gsplat opts
    CUDA tensors into gsplat (the value is checked on every device)."""
    return dnnlib.util.optional_backend(BACKEND_ENV, ('pytorch', 'gsplat'), 'Gaussian rasterizer', means.is_cuda)


def rasterize_gaussians(means: torch.Tensor, covariances: torch.Tensor, opacities: torch.Tensor, features: torch.Tensor,
                        c: torch.Tensor, image_size: Union[int, Tuple[int, int]], background: Optional[torch.Tensor] = None, *,
                        backend: str = 'auto', eps2d: float = EPS2D, near_plane: float = NEAR_PLANE,
                        tile_size: int = TILE_SIZE) -> Rendered:
    """Splat B scenes of N Gaussians, each into its own camera.

    Args:
        means:       (B, N, 3) world centres.
        covariances: (B, N, 3, 3) world covariances (symmetric positive definite).
        opacities:   (B, N) in [0, 1].
        features:    (B, N, C) colours or features.
        c:           (B, 25+) camera labels (OpenCV cam2world + normalised intrinsics).
        image_size:  int or (H, W).
        background:  None (0), (B, C) or (B, C, H, W): what shows through where alpha < 1.
        backend:     'auto' | 'pytorch' | 'gsplat' ('auto': `auto_backend`; module docstring).
        tile_size:   tile side of the 'pytorch' backend (the result does not depend on it;
                     gsplat uses its own 16).
    Returns:
        Rendered(features (B, C, H, W), alpha (B, 1, H, W), depth (B, 1, H, W)).
    """
    _check_inputs(means, covariances, opacities, features, c)
    h, w = _image_hw(image_size)
    if backend not in BACKENDS:
        raise ValueError(f"unknown Gaussian rasterizer backend {backend!r} (expected {', '.join(BACKENDS)})")
    if backend == 'auto':
        backend = auto_backend(means)
    if backend == 'gsplat':
        if not means.is_cuda:
            raise ValueError("the 'gsplat' Gaussian rasterizer backend needs CUDA tensors")
        if not gsplat_available():
            raise ValueError("the 'gsplat' Gaussian rasterizer backend needs the gsplat package (pip install gsplat)")
        acc, trans = _rasterize_gsplat(means, covariances, opacities, features, c, h, w, eps2d, near_plane)
    else:
        proj = project_gaussians(means, covariances, opacities, c, h, w, eps2d, near_plane)
        acc, trans = _rasterize_pytorch(proj, opacities, features, h, w, tile_size)
    return _finish(acc, trans, h, w, background)


# ----------------------------------------------------------------------------------------
# Point queries: the Gaussians as a density field (shapes, density regularisation)

DENSITY_CUTOFF = 1e-3          # a Gaussian's contribution is dropped where it is below this


def gaussian_density(points: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor, opacities: torch.Tensor,
                     features: Optional[torch.Tensor] = None):
    """Density sum_i o_i exp(-(x - mu_i)^T Sigma_i^-1 (x - mu_i) / 2) at points (unitless: an
    opaque Gaussian's centre counts 1), and optionally the density-weighted mean feature.

    points (B, M, 3), means (B, N, 3), covariances (B, N, 3, 3), opacities (B, N),
    features (B, N, C) or None. Returns density (B, M) [and features (B, M, C)].
    The points are sorted into cells of a coarse grid and taken in blocks (of at least 32
    points, at most 256 blocks per call); a block evaluates only the Gaussians whose 3D box (where the
    contribution exceeds DENSITY_CUTOFF) meets the block's bounding box. Differentiable.
    """
    bsz, m = points.shape[:2]
    precision = torch.linalg.inv(covariances.double()).to(covariances.dtype)    # thin Gaussians: ill-conditioned in float32
    block = max(32, -(-m // 256))
    nblocks = -(-m // block)
    with torch.no_grad():
        reach = 2 * torch.log((opacities / DENSITY_CUTOFF).clamp(min=1))       # d^T P d bound
        half = torch.sqrt(reach[..., None] * torch.diagonal(covariances, dim1=-2, dim2=-1).clamp(min=0))   # (B, N, 3) box
        # Spatially coherent blocks: sort the points by the cell of a grid with ~ one cell per block.
        cells = max(1, round(nblocks ** (1 / 3)))
        lo, hi = points.amin(1, keepdim=True), points.amax(1, keepdim=True)
        cell = ((points - lo) / (hi - lo).clamp(min=1e-12) * cells).long().clamp(0, cells - 1)
        order = torch.argsort((cell[..., 0] * cells + cell[..., 1]) * cells + cell[..., 2], dim=1, stable=True)
        order = torch.cat([order, order[:, -1:].expand(bsz, nblocks * block - m)], dim=1)     # pad with repeats
    pts = torch.gather(points, 1, order[..., None].expand(-1, -1, 3)).reshape(bsz, nblocks, block, 3)
    with torch.no_grad():
        box_lo, box_hi = pts.amin(2), pts.amax(2)                               # (B, nb, 3)
        meets = ((means.detach()[:, None] + half[:, None] >= box_lo[:, :, None]) &
                 (means.detach()[:, None] - half[:, None] <= box_hi[:, :, None])).all(-1) & (reach > 0)[:, None]
        b_idx, blk, g_idx = torch.nonzero(meets, as_tuple=True)                # (b, block, Gaussian) triples
    density = points.new_zeros(bsz * nblocks * block)
    acc = None if features is None else points.new_zeros(bsz * nblocks * block, features.shape[-1])
    per = max(1, _PAIRS_PER_CHUNK // block)
    flat_pts = pts.reshape(bsz * nblocks, block, 3)
    for s in range(0, len(g_idx), per):
        b, k, g = b_idx[s:s + per], blk[s:s + per], g_idx[s:s + per]
        rows = b * nblocks + k
        d = flat_pts[rows] - means[b, g][:, None]                              # (T, block, 3)
        q = torch.einsum('tpi,tij,tpj->tp', d, precision[b, g], d)
        contrib = opacities[b, g][:, None] * torch.exp(-0.5 * q)
        target = (rows[:, None] * block + torch.arange(block, device=points.device)).reshape(-1)
        density = density.index_add(0, target, contrib.reshape(-1))
        if acc is not None:
            acc = acc.index_add(0, target, (contrib[..., None] * features[b, g][:, None]).reshape(-1, features.shape[-1]))
    # Back to the callers' order (the padding repeats are dropped).
    back = torch.argsort(order[:, :m], dim=1)
    density = torch.gather(density.reshape(bsz, -1), 1, back)
    if features is None:
        return density
    acc = torch.gather(acc.reshape(bsz, nblocks * block, -1), 1, back[..., None].expand(-1, -1, acc.shape[-1]))
    return density, acc / density.clamp(min=1e-8).unsqueeze(-1)
