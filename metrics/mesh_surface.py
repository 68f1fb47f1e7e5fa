"""Whether the generated density forms an opaque surface on the driving mesh.

`mesh_depth_err` alone does not show geometry: a translucent fog whose expected depth
happens to lie near the face scores well (pretrained_models/README.md, issue 18). These
three numbers say what the density does on the same rays. Samples: z, camera labels and
driving meshes of `num_gen` dataset items drawn as `mesh_depth_err` draws them (seed 1,
`metric_utils.generator_batches`: the same samples for the same count and batch
size), rendered by G's own renderer at its neural rendering resolution, with its random
depth samples drawn from a generator seeded with RENDER_SEED (the values repeat exactly).
The face region is `mesh_depth_error`'s: pixels where the mesh is visible and its
face/eye UV mask is >= 0.5 (every covered pixel for a generator without a mask).

opacity       mean over the face-region rays of all samples of the ray's opacity: the sum
              of the renderer's compositing weights (0 = empty, 1 = opaque).
peak_density  for each offset t in OFFSETS (-0.15 to +0.15 world units, step 0.01) along
              each face-region ray from the mesh's depth on that ray (t > 0: behind the
              surface), G's density at that point, softplus(sigma - 1) per world unit (the
              ray marcher's activation), averaged over the face-region rays of all
              samples; the largest of these 31 means. An opaque surface needs tens per
              world unit (the expected depth lies about 1 / density behind it).
depth_corr    per sample, the Pearson correlation of the rendered depth (`image_depth`)
              and the mesh depth over its face-region pixels; the mean over the samples
              with at least MIN_PIXELS of them (a sample whose depths are constant
              counts 0). 1 = the rendered depth has the mesh's shape.
"""

import copy

import torch

from metrics import mesh_depth_error
from metrics import metric_utils
from training import coords

OFFSETS = torch.linspace(-0.15, 0.15, 31)      # world units along the ray from the mesh surface
MIN_PIXELS = 16                                 # face-region pixels a sample needs to count in depth_corr
RENDER_SEED = 0


def check_generator(G, metric: str):
    """Raise ValueError for a generator that is not mesh-driven (naming `metric`) or not a tri-plane one."""
    mesh_depth_error.check_generator(G, metric)
    for name in ('mapping', 'make_planes', 'ray_sampler', 'renderer', 'decoder'):
        if not hasattr(G, name):
            raise ValueError(f'mesh_surface needs a tri-plane (Next3D) generator; {type(G).__name__} has no {name}')


def render_rays(G, z: torch.Tensor, c: torch.Tensor, v: torch.Tensor, generator: torch.Generator):
    """G's raw rendering of z (B, z_dim), c (B, 25+), v (B, V + 68, 3), as `G.synthesis` renders it
    -> (planes, origins (B, N, 3), directions (B, N, 3), depth (B, 1, r, r), opacity (B, 1, r, r))."""
    c = c[:, :max(int(G.c_dim), 25)]
    ws = G.mapping(z, c)
    planes = G.make_planes(ws, v, noise_mode='const')
    r = G.neural_rendering_resolution
    origins, directions = G.ray_sampler(*coords.split_label(c), r)
    _, depth, weights = G.renderer(planes, G.decoder, origins, directions, G.rendering_kwargs, generator=generator)
    return planes, origins, directions, depth.view(len(z), 1, r, r), weights.sum(2).view(len(z), 1, r, r)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two (M,) tensors, in float64; 0 when either is constant."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    norm = a.norm() * b.norm()
    return (a * b).sum() / norm if norm > 0 else norm


@torch.no_grad()
def compute_mesh_surface(opts: metric_utils.MetricOptions, num_gen: int, name: str) -> dict:
    """{name}_opacity, {name}_peak_density, {name}_depth_corr over `num_gen` samples (shared by the ranks)."""
    G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
    check_generator(G, name)
    faces, uv = mesh_depth_error.face_region_buffers(G, name)
    offsets = OFFSETS.to(opts.device)
    generator = metric_utils.render_generator(opts, RENDER_SEED)
    # Sums over this rank's rays and samples: opacity, face rays, density per offset, correlations, samples counted.
    sums = torch.zeros(4 + len(offsets), dtype=torch.float64, device=opts.device)
    for z, c, v in metric_utils.generator_batches(opts, num_gen, seed=1):
        n = len(z)
        planes, origins, directions, depth, opacity = render_rays(G, z, c, v, generator)
        mesh_depth, region = mesh_depth_error.mesh_ray_depth(v[:, :-mesh_depth_error.NUM_LANDMARKS], faces, c[:, :25],
                                                             depth.shape[-1], uv)
        sums[0] += opacity[region].sum().double()
        sums[1] += region.sum()
        rays = region.view(n, -1)
        along = torch.where(region, mesh_depth, depth).view(n, -1, 1)     # finite everywhere; only face rays are read
        for k, t in enumerate(offsets):
            sigma = G.renderer.run_model(planes, G.decoder, origins + (along + t) * directions, directions, G.rendering_kwargs,
                                         generator=generator)['sigma']
            sums[2 + k] += torch.nn.functional.softplus(sigma[..., 0] - 1)[rays].sum().double()
        for b in range(n):
            if region[b].sum() >= MIN_PIXELS:
                sums[-2] += correlation(depth[b][region[b]], mesh_depth[b][region[b]])
                sums[-1] += 1
    if opts.num_gpus > 1:
        torch.distributed.all_reduce(sums)
    if sums[1] == 0:
        raise ValueError(f'{name}: the meshes\' face region covers no pixel from the dataset cameras')
    return {f'{name}_opacity': float(sums[0] / sums[1]),
            f'{name}_peak_density': float((sums[2:-2] / sums[1]).max()),
            f'{name}_depth_corr': float(sums[-2] / sums[-1]) if sums[-1] > 0 else float('nan')}
