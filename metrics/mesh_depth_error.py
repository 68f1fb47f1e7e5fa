"""How closely the generated geometry follows the driving mesh.

For each sample, the driving mesh (canonical metres -> world with `coords.mesh_to_world`)
is rasterized from the sample's camera at the neural rendering resolution, with
perspective-correct depth; its depth is converted from camera z to distance along the
pixel's ray, which is what the generator's `image_depth` holds (world units). The error
is the mean absolute difference over the face region: pixels where the mesh is visible
and its face/eye UV mask (the generator's topology buffers) is at least 0.5. Hair, the
back of the head and the background are not constrained by the mesh and are left out.
A generator without a UV mask uses every pixel the mesh covers.

Samples: z, camera labels and driving meshes of `num_gen` dataset items drawn with seed 1
(`metric_utils.generator_batches`), G's random depth samples from a generator seeded
with RENDER_SEED: the value repeats exactly for the same count and batch size.
"""

import copy

import torch

from metrics import metric_utils
from training import coords
from training.mesh import rasterize as raster

NUM_LANDMARKS = 68
RENDER_SEED = 0       # of the renderer's random depth samples (`metric_utils.render_generator`)


def mesh_ray_depth(v: torch.Tensor, faces: torch.Tensor, c: torch.Tensor, resolution: int, uv: tuple = None):
    """Mesh depth along each pixel's ray: ((B, 1, r, r) world units, (B, 1, r, r) bool region).

    v: (B, V, 3) canonical metres; faces: (F, 3) int64; c: (B, 25+) camera labels.
    uv: optional (uvcoords (T, 2) v up, uvfaces (F, 3), uv_mask (1, 1, S, S) row 0 = v = 1):
    the region is then restricted to covered pixels where the mask is >= 0.5.
    """
    world = coords.mesh_to_world(v)
    ndc = raster.project_perspective(world, c)
    frags = raster.rasterize(ndc, faces, resolution, cull_backfaces=True)
    z = raster.interpolate(ndc[..., 2:3], frags, faces, perspective_correct=True, verts=ndc)     # (B, 1, r, r) camera z
    region = (frags.pix_to_face >= 0)[:, None]
    if uv is not None:
        uvcoords, uvfaces, uv_mask = uv
        corner_uv = uvcoords[uvfaces].expand(len(v), -1, -1, -1)                                       # (B, F, 3, 2)
        texel = raster.interpolate(corner_uv, frags, faces, perspective_correct=True, verts=ndc)     # (B, 2, r, r)
        grid = torch.stack([texel[:, 0] * 2 - 1, 1 - texel[:, 1] * 2], dim=-1)
        mask = torch.nn.functional.grid_sample(uv_mask.to(grid.dtype).expand(len(grid), -1, -1, -1), grid, mode='bilinear',
                                               padding_mode='zeros', align_corners=False)
        region = region & (mask >= 0.5)
    # Pixel centre direction in camera space: ((u - cx) / fx, (v - cy) / fy, 1), u, v in [0, 1].
    _, intr = coords.split_label(c.to(v.dtype))
    centres = (torch.arange(resolution, device=v.device, dtype=v.dtype) + 0.5) / resolution
    uu, vv = centres[None, None, :], centres[None, :, None]
    fx, fy = intr[:, 0, 0, None, None], intr[:, 1, 1, None, None]
    cx, cy, skew = intr[:, 0, 2, None, None], intr[:, 1, 2, None, None], intr[:, 0, 1, None, None]
    y_n = (vv - cy) / fy
    x_n = (uu - cx - skew * y_n) / fx
    norm = torch.sqrt(x_n.square() + y_n.square() + 1)
    return z * norm[:, None], region


def check_generator(G, metric: str, topology: bool = False):
    """Raise ValueError naming `metric` for a generator that is not mesh-driven (no mesh rasterizer)
    or, with `topology`, lacks its topology (train.py checks a G built on the meta device, without)."""
    if getattr(G, 'rasterizer', None) is None or (topology and not getattr(G, 'topology_loaded', True)):
        raise ValueError(f'{metric} needs a mesh-driven (Next3D) generator with its topology loaded')


def face_region_buffers(G, metric: str):
    """G's mesh faces (F, 3) and, when it has them, its (uvcoords, uvfaces, uv_mask) for `mesh_ray_depth`.

    Raises ValueError naming `metric` for a generator that is not mesh-driven or lacks its topology.
    """
    check_generator(G, metric, topology=True)
    rasterizer = G.rasterizer
    uv = None
    if all(hasattr(rasterizer, k) for k in ('uvcoords', 'uvfaces', 'uv_mask')):
        uv = (rasterizer.uvcoords, rasterizer.uvfaces, rasterizer.uv_mask)
    return rasterizer.faces, uv


@torch.no_grad()
def compute_mesh_depth_error(opts: metric_utils.MetricOptions, num_gen: int) -> float:
    """Mean |image_depth - mesh depth| (world units) over the face region of `num_gen` samples (shared by the ranks)."""
    G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
    faces, uv = face_region_buffers(G, 'mesh_depth_err')
    generator = metric_utils.render_generator(opts, RENDER_SEED)
    total = torch.zeros([], dtype=torch.float64, device=opts.device)
    count = torch.zeros([], dtype=torch.float64, device=opts.device)
    for z, c, v in metric_utils.generator_batches(opts, num_gen, seed=1):
        out = G(z=z, c=c[:, :max(int(G.c_dim), 25)], v=v, noise_mode='const', generator=generator)
        depth = out['image_depth']
        mesh_depth, covered = mesh_ray_depth(v[:, :-NUM_LANDMARKS], faces, c[:, :25], depth.shape[-1], uv)
        total += ((depth - mesh_depth).abs() * covered).sum().double()
        count += covered.sum().double()
    if opts.num_gpus > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    if count == 0:
        raise ValueError('mesh_depth_err: the meshes\' face region covers no pixel from the dataset cameras')
    return float(total / count)
