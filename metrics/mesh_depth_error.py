"""How closely the generated geometry follows the driving mesh.

For each sample, the driving mesh (canonical metres -> world with `coords.mesh_to_world`)
is rasterized from the sample's camera at the neural rendering resolution, with
perspective-correct depth; its depth is converted from camera z to distance along the
pixel's ray, which is what the generator's `image_depth` holds (world units). The error
is the mean absolute difference over the pixels the mesh covers (the head surface the
mesh defines; hair and background are not constrained by the mesh and are left out).
"""

import copy

import torch

from metrics import metric_utils
from training import coords
from training.mesh import rasterize as raster

NUM_LANDMARKS = 68


def mesh_ray_depth(v: torch.Tensor, faces: torch.Tensor, c: torch.Tensor, resolution: int):
    """Mesh depth along each pixel's ray: ((B, 1, r, r) world units, (B, 1, r, r) bool coverage).

    v: (B, V [+ 68], 3) canonical metres (landmarks, if present, are ignored via `faces`);
    faces: (F, 3) int64; c: (B, 25+) camera labels.
    """
    world = coords.mesh_to_world(v)
    ndc = raster.project_perspective(world, c)
    frags = raster.rasterize(ndc, faces, resolution, cull_backfaces=True)
    z = raster.interpolate(ndc[..., 2:3], frags, faces, perspective_correct=True, verts=ndc)     # (B, 1, r, r) camera z
    covered = (frags.pix_to_face >= 0)[:, None]
    # Pixel centre direction in camera space: ((u - cx) / fx, (v - cy) / fy, 1), u, v in [0, 1].
    _, intr = coords.split_label(c.to(v.dtype))
    centres = (torch.arange(resolution, device=v.device, dtype=v.dtype) + 0.5) / resolution
    uu, vv = centres[None, None, :], centres[None, :, None]
    fx, fy = intr[:, 0, 0, None, None], intr[:, 1, 1, None, None]
    cx, cy, skew = intr[:, 0, 2, None, None], intr[:, 1, 2, None, None], intr[:, 0, 1, None, None]
    y_n = (vv - cy) / fy
    x_n = (uu - cx - skew * y_n) / fx
    norm = torch.sqrt(x_n.square() + y_n.square() + 1)
    return z * norm[:, None], covered


@torch.no_grad()
def compute_mesh_depth_error(opts: metric_utils.MetricOptions, num_gen: int) -> float:
    """Mean |image_depth - mesh depth| (world units) over mesh-covered pixels of `num_gen` samples (shared by the ranks)."""
    G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
    rasterizer = getattr(G, 'rasterizer', None)
    if rasterizer is None or not getattr(G, 'topology_loaded', True):
        raise ValueError('mesh_depth_err needs a mesh-driven (Next3D) generator with its topology loaded')
    faces = rasterizer.faces.to(opts.device)
    inputs = metric_utils.iterate_generator_inputs(opts, opts.batch_size, seed=1)
    total = torch.zeros([], dtype=torch.float64, device=opts.device)
    count = torch.zeros([], dtype=torch.float64, device=opts.device)
    done = 0
    num_gen = (num_gen + opts.num_gpus - 1) // opts.num_gpus      # this rank's share
    while done < num_gen:
        z, c, v = next(inputs)
        n = min(opts.batch_size, num_gen - done)
        z, c, v = z[:n], c[:n], v[:n]
        out = G(z=z, c=c[:, :max(int(G.c_dim), 25)], v=v, noise_mode='const')
        depth = out['image_depth']
        mesh_depth, covered = mesh_ray_depth(v[:, :-NUM_LANDMARKS], faces, c[:, :25], depth.shape[-1])
        total += ((depth - mesh_depth).abs() * covered).sum().double()
        count += covered.sum().double()
        done += n
    inputs.close()
    if opts.num_gpus > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    if count == 0:
        raise ValueError('mesh_depth_err: the meshes cover no pixel from the dataset cameras')
    return float(total / count)
