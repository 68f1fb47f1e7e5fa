"""Tri-plane volume renderer with hierarchical (importance) sampling.

Each ray is sampled in two passes: `depth_resolution` stratified samples between
`ray_start` and `ray_end`, then `depth_resolution_importance` samples drawn from the coarse
pass's compositing weights. The decoder runs on both sets; the merged, sorted samples are
composited by MipRayMarcher2.

Rendering options (a plain dict, usually G's `rendering_kwargs`; other keys are ignored):
    ray_start, ray_end            float world units along unit directions, or both 'auto':
                                  the ray's entry and exit of the cube [-box_warp/2, box_warp/2]^3.
    box_warp                      side of the tri-plane cube in world units (coords.BOX_WARP).
    depth_resolution              stratified samples per ray (EG3D: 48).
    depth_resolution_importance   importance samples per ray (EG3D: 48; 0 disables the pass).
    disparity_space_sampling      bool, default False: stratify in 1/depth instead of depth.
    clamp_mode                    density activation, default 'softplus' (see ray_marcher).
    white_back                    bool, default False.
    density_noise                 float, default 0: std of Gaussian noise added to sigma.
    deterministic_sampling        bool, default False: u = 0.5 in the stratified pass and
                                  evenly spaced quantiles in the importance pass.

Sampling follows EG3D exactly (see sample_stratified and sample_importance). Its random
numbers come from the `generator` passed to ImportanceRenderer.forward (a torch.Generator
on the rays' device), or from torch's global generator when None (training).
"""

from typing import Optional

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops import bilinear_mean
from training import coords
from training.volumetric_rendering.ray_marcher import MipRayMarcher2

REQUIRED_OPTIONS = ('ray_start', 'ray_end', 'box_warp', 'depth_resolution', 'depth_resolution_importance')


def sample_from_planes(planes: torch.Tensor, coordinates: torch.Tensor, plane_axes: str = 'next3d',
                       box_warp: float = coords.BOX_WARP, mode: str = 'bilinear', padding_mode: str = 'zeros') -> torch.Tensor:
    """Bilinearly sample three feature planes at world points.

    Args:
        planes:      (B, 3, C, H, W) features; plane k's columns and rows follow the world
                     axes coords.PLANE_AXES[plane_axes][k], spanning [-box_warp/2, box_warp/2]
                     edge to edge (grid_sample, align_corners=False).
        coordinates: (B, N, 3) world points.
    Returns:
        (B, 3, N, C) features per plane, in float32 for half-precision planes; points outside
        the cube read zeros (padding_mode).
    """
    misc.assert_shape(planes, [None, 3, None, None, None], 'planes')
    batch_size, _, channels, height, width = planes.shape
    misc.assert_shape(coordinates, [batch_size, None, 3], 'coordinates')
    num_points = coordinates.shape[1]
    grid = coords.project_onto_planes(coordinates, plane_axes=plane_axes, box_warp=box_warp)   # (B, 3, N, 2)
    # Half-precision grids cannot address a 256 texel plane to better than ~0.1 texel: sample in float32 or wider.
    dtype = torch.promote_types(planes.dtype, torch.float32)
    grid = grid.to(dtype).reshape(batch_size * 3, 1, num_points, 2)
    features = torch.nn.functional.grid_sample(planes.to(dtype).reshape(batch_size * 3, channels, height, width), grid,
                                               mode=mode, padding_mode=padding_mode, align_corners=False)
    return features.reshape(batch_size, 3, channels, num_points).permute(0, 1, 3, 2)


def sample_plane_mean(planes: torch.Tensor, coordinates: torch.Tensor, plane_axes: str = 'next3d',
                      box_warp: float = coords.BOX_WARP, table_cache: Optional[dict] = None) -> torch.Tensor:
    """Mean of the three planes' bilinear samples at world points: what OSGDecoder reads.

    Equals sample_from_planes(planes, coordinates, plane_axes, box_warp).mean(1) (bilinear,
    zero padding, align_corners=False) up to float rounding; on the CPU without gradients
    for the points, as one weighted sum of 12 texels per point (ops.bilinear_mean).

    Args:
        planes:      (B, 3, C, H, W), as sample_from_planes.
        coordinates: (B, N, 3) world points.
        table_cache: for several calls on the same planes, see ops.bilinear_mean.
    Returns:
        (B, N, C), in float32 for half-precision planes.
    """
    misc.assert_shape(planes, [None, 3, None, None, None], 'planes')
    misc.assert_shape(coordinates, [planes.shape[0], None, 3], 'coordinates')
    grid = coords.project_onto_planes(coordinates, plane_axes=plane_axes, box_warp=box_warp)   # (B, 3, N, 2)
    return bilinear_mean.bilinear_mean(planes, grid, table_cache=table_cache)


def ray_points(ray_origins: torch.Tensor, ray_directions: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """origin + depth * direction: ray_origins, ray_directions (B, N, 3), depths (B, N, S, 1) ->
    (B, N, S, 3).

    On the CPU without a graph to record, one coordinate at a time (a product, then the
    sum in place): the same values, where the broadcast over (S, 3) runs 3-element inner
    loops (4,096 rays of 24 samples, one thread: about 0.5 against 0.7-1.3 ms)."""
    if ray_origins.device.type != 'cpu' or misc.records_graph(ray_origins, ray_directions, depths) or torch.compiler.is_compiling():
        return ray_origins.unsqueeze(2) + depths * ray_directions.unsqueeze(2)
    dtype = torch.promote_types(torch.promote_types(ray_origins.dtype, ray_directions.dtype), depths.dtype)
    shape = torch.broadcast_shapes(ray_origins.unsqueeze(2).shape, ray_directions.unsqueeze(2).shape, depths.shape)
    points = torch.empty(shape, dtype=dtype, device=depths.device)
    for c in range(3):
        torch.mul(depths[..., 0], ray_directions[..., c:c + 1], out=points[..., c]).add_(ray_origins[..., c:c + 1])
    return points


def ray_box_intersection(ray_origins: torch.Tensor, ray_directions: torch.Tensor, box_side: float):
    """Entry and exit depths of rays through the cube [-box_side/2, box_side/2]^3 (slab method).

    Args:
        ray_origins, ray_directions: (B, N, 3) world units.
    Returns:
        ray_start, ray_end: (B, N, 1) depths along the directions (start >= 0).
        is_valid:           (B, N, 1) bool, the ray meets the cube in front of its origin.
    """
    half = box_side / 2
    tiny = torch.full_like(ray_directions, 1e-12).copysign(ray_directions)
    directions = torch.where(ray_directions.abs() < 1e-12, tiny, ray_directions)
    t_low = (-half - ray_origins) / directions
    t_high = (half - ray_origins) / directions
    ray_start = torch.minimum(t_low, t_high).amax(dim=-1, keepdim=True).clamp(min=0)
    ray_end = torch.maximum(t_low, t_high).amin(dim=-1, keepdim=True)
    return ray_start, ray_end, ray_end > ray_start


def sample_stratified(ray_start: torch.Tensor, ray_end: torch.Tensor, num_samples: int, disparity_space: bool = False,
                      deterministic: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """EG3D's coarse depths: S evenly spaced depths from ray_start to ray_end inclusive, each
    moved forward by u (end - start) / (S - 1), u uniform in [0, 1) per sample. The last
    sample thus lies up to one spacing beyond ray_end, as in EG3D.

    disparity_space: the same on s in [0, 1], then depth = 1 / ((1 - s) / start + s / end).

    Args:
        ray_start, ray_end: (B, N, 1) depths.
        deterministic:      u = 0.5 for every sample.
        generator:          torch.Generator for u (on the depths' device); None = the global one.
    Returns:
        (B, N, num_samples, 1) increasing depths.
    """
    if num_samples < 2:
        raise ValueError(f'sample_stratified: need at least 2 samples per ray, got {num_samples}')
    batch_size, num_rays, _ = ray_start.shape
    device, dtype = ray_start.device, ray_start.dtype
    steps = torch.arange(num_samples, device=device, dtype=dtype).reshape(1, 1, -1, 1) / (num_samples - 1)
    if deterministic:
        u = torch.full((batch_size, num_rays, num_samples, 1), 0.5, device=device, dtype=dtype)
    else:
        u = torch.rand((batch_size, num_rays, num_samples, 1), generator=generator, device=device, dtype=dtype)
    start, end = ray_start.unsqueeze(-1), ray_end.unsqueeze(-1)
    if disparity_space:
        s = steps + u / (num_samples - 1)
        return 1 / (1 / start * (1 - s) + 1 / end * s)
    # (EG3D calls torch.linspace for fixed ranges, which rounds 2 of 48 depths 1 ulp apart from this.)
    return start + steps * (end - start) + u * (end - start) / (num_samples - 1)


def searchsorted_right(sorted_rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """torch.searchsorted(sorted_rows, values, right=True): for each value, how many entries of
    its row are <= it. sorted_rows (M, K) non-decreasing, values (M, S) -> (M, S) int64.

    On the CPU, for rows of up to 255 entries, a count: one comparison of all values per
    entry, summed in uint8. torch's CPU searchsorted searches value by value; for EG3D's
    importance sampling (16,384 rays, 24 values in 22 entries, one thread) 7.6 against 14 ms.
    The same result (values or rows holding NaN aside: a NaN compares false here)."""
    if sorted_rows.device.type != 'cpu' or sorted_rows.shape[1] > 255 or torch.compiler.is_compiling():
        return torch.searchsorted(sorted_rows.contiguous(), values, right=True)
    count = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    at_or_below = torch.empty_like(count)
    for k in range(sorted_rows.shape[1]):
        torch.ge(values, sorted_rows[:, k:k + 1], out=at_or_below.view(torch.bool))
        count.add_(at_or_below)
    return count.long()


def sort_samples(depths: torch.Tensor):
    """torch.sort(depths, dim=2) of depths (B, R, S, 1): (sorted depths, order) along each ray.

    On the CPU NumPy sorts the order (its quicksort runs vector code: 4,096 rays of 48
    samples, one thread, 1.8 against torch's 7.3 ms). Both sorts are unstable: equal
    depths on a ray may come in another order (exact ties of random depths: in practice
    never; they would be the same point, whose densities differ only by density noise)."""
    if (depths.device.type != 'cpu' or depths.dtype not in (torch.float16, torch.float32, torch.float64)
            or torch.compiler.is_compiling()):
        return torch.sort(depths, dim=2)
    order = torch.from_numpy(np.argsort(depths.detach().numpy(), axis=2)).long()
    return gather_samples(depths, order), order


def gather_samples(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x.gather(2, order) for (B, R, S, 1) tensors, as a gather along the last dimension of
    their (B R, S) view: on the CPU 3-4x faster than along dimension 2 of 4 (4,096 rays of
    48 samples: 0.2 against 0.7 ms), the same values."""
    num_samples = x.shape[2]
    return x.reshape(-1, num_samples).gather(1, order.reshape(-1, num_samples)).view(order.shape)


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, num_samples: int, deterministic: bool = False,
               generator: Optional[torch.Generator] = None, eps: float = 1e-5) -> torch.Tensor:
    """Inverse-CDF samples of the piecewise-constant density given by `weights` on `bins`
    (NeRF's and EG3D's sample_pdf).

    Every bin gets eps more weight, so no bin is empty; a CDF step below eps (a bin the
    rounding made empty) interpolates as if it were 1 wide, i.e. returns its lower edge.

    Args:
        bins:    (M, K + 1) increasing bin edges.
        weights: (M, K) non-negative weight of each bin (normalised here).
        deterministic: quantiles u = (i + 0.5) / num_samples instead of uniform random ones.
        generator: torch.Generator for u (on the bins' device); None = the global one.
    Returns:
        (M, num_samples) samples (detached: not differentiable in bins or weights).
    """
    bins, weights = bins.detach(), weights.detach()
    misc.assert_shape(weights, [bins.shape[0], bins.shape[1] - 1], 'weights')
    num_rows, num_bins = weights.shape
    weights = weights + eps
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1)], dim=-1)   # (M, K + 1)
    if deterministic:
        u = (torch.arange(num_samples, device=bins.device, dtype=bins.dtype) + 0.5) / num_samples
        u = u.expand(num_rows, num_samples).contiguous()
    else:
        u = torch.rand((num_rows, num_samples), generator=generator, device=bins.device, dtype=bins.dtype)
    # u at or above the rounded top of the CDF falls into the last edge (above = below = K).
    index = searchsorted_right(cdf, u)
    below = (index - 1).clamp(min=0)
    above = index.clamp(max=num_bins)
    cdf_below, cdf_above = cdf.gather(1, below), cdf.gather(1, above)
    bins_below, bins_above = bins.gather(1, below), bins.gather(1, above)
    step = cdf_above - cdf_below
    step = torch.where(step < eps, torch.ones_like(step), step)
    return bins_below + (u - cdf_below) / step * (bins_above - bins_below)


def sample_importance(depths: torch.Tensor, weights: torch.Tensor, num_samples: int, deterministic: bool = False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """New depths drawn where the coarse pass put its compositing weight, as EG3D.

    The S - 1 interval weights are smoothed (max-pool over neighbours with padding: S values,
    then average-pool: S - 1 values, then + 0.01 so that no interval is starved). The pdf
    lives on the mid-points m_0..m_{S-2} of the coarse depths: bin [m_k, m_{k+1}] (around
    depth t_{k+1}) takes smoothed weight k + 1, for k = 0..S-4. The last bin [m_{S-3}, m_{S-2}]
    gets none: EG3D applies NeRF's per-sample recipe (S weights, S - 1 mid-points) to S - 1
    interval weights, and we keep that for identical renders.

    Args:
        depths:  (B, N, S, 1) increasing coarse depths, S >= 4.
        weights: (B, N, S - 1, 1) weights from MipRayMarcher2.
        generator: torch.Generator for the quantiles; None = the global one.
    Returns:
        (B, N, num_samples, 1) depths (detached).
    """
    batch_size, num_rays, num_coarse, _ = depths.shape
    misc.assert_shape(weights, [batch_size, num_rays, num_coarse - 1, 1], 'weights')
    if num_coarse < 4:
        raise ValueError(f'sample_importance: need at least 4 coarse samples per ray, got {num_coarse}')
    w = weights.detach().reshape(batch_size * num_rays, num_coarse - 1)
    # max_pool1d(kernel 2, stride 1, padding 1), then avg_pool1d(kernel 2, stride 1), as
    # elementwise operations: the same values bit for bit, 5x faster on the CPU (pooling
    # windows of 2 over rows of 47 run one small loop each).
    # (Written with slice assignments, not a strided out=, which torch.compile cannot trace.)
    peak = w.new_empty(w.shape[0], num_coarse)                                     # (M, S)
    peak[:, 0], peak[:, -1] = w[:, 0], w[:, -1]
    peak[:, 1:-1] = torch.maximum(w[:, :-1], w[:, 1:])
    w = (peak[:, :-1] + peak[:, 1:]) / 2 + 0.01                                    # (M, S - 1)
    t = depths.detach().reshape(batch_size * num_rays, num_coarse)
    mids = (t[:, :-1] + t[:, 1:]) / 2                                             # (M, S - 1)
    fine = sample_pdf(mids[:, :-1], w[:, 1:-1], num_samples, deterministic=deterministic, generator=generator)
    return fine.reshape(batch_size, num_rays, num_samples, 1)


def per_image(planes: torch.Tensor, opts: dict) -> bool:
    """Whether ImportanceRenderer.forward renders image by image (see there): on the CPU, without density noise."""
    return planes.device.type == 'cpu' and float(opts.get('density_noise', 0)) == 0


@persistence.persistent_class
class ImportanceRenderer(torch.nn.Module):
    """Render tri-planes through a decoder along given rays. No parameters."""

    def __init__(self,
        plane_axes: str = 'next3d',     # Tri-plane layout, a key of coords.PLANE_AXES.
    ):
        super().__init__()
        if plane_axes not in coords.PLANE_AXES:
            raise ValueError(f'ImportanceRenderer: unknown plane_axes {plane_axes!r}, expected one of {tuple(coords.PLANE_AXES)}')
        self.plane_axes = plane_axes
        self.ray_marcher = MipRayMarcher2()

    def extra_repr(self) -> str:
        return f'plane_axes={self.plane_axes!r}'

    def forward(self, planes: torch.Tensor, decoder: torch.nn.Module, ray_origins: torch.Tensor,
                ray_directions: torch.Tensor, rendering_options: dict, generator: Optional[torch.Generator] = None):
        """Volume-render the tri-plane along each ray.

        Args:
            planes:         (B, 3, C, H, W) tri-plane features.
            decoder:        module called as decoder(features (B, 3, M, C), directions (B, M, 3))
                            -> dict(rgb=(B, M, C'), sigma=(B, M, 1)), e.g. OSGDecoder; one with a
                            `forward_plane_mean(features (B, M, C), directions)` method gets
                            the mean of the three planes' features instead (see run_model).
            ray_origins:    (B, N, 3) world units.
            ray_directions: (B, N, 3) unit vectors (depths are then distances).
            rendering_options: see the module docstring.
            generator:      torch.Generator (on the rays' device) for the depth jitter, the
                            importance quantiles and density_noise; None = the global one.
        Returns:
            feature_samples: (B, N, C') composited features in [-1, 1] (see MipRayMarcher2).
            depth_samples:   (B, N, 1) expected depth.
            weights:         (B, N, S - 1, 1) compositing weights of the S - 1 intervals between
                             the S = depth_resolution + depth_resolution_importance sorted samples;
                             weights.sum(2) is the opacity.
        """
        opts = rendering_options
        missing = [key for key in REQUIRED_OPTIONS if key not in opts]
        if missing:
            raise ValueError(f'ImportanceRenderer: rendering_options lacks {missing} (needs {list(REQUIRED_OPTIONS)})')
        misc.assert_shape(ray_origins, [planes.shape[0], None, 3], 'ray_origins')
        misc.assert_shape(ray_directions, list(ray_origins.shape), 'ray_directions')
        deterministic = bool(opts.get('deterministic_sampling', False))

        ray_start, ray_end = self._ray_limits(ray_origins, ray_directions, opts)
        depths = sample_stratified(ray_start, ray_end, int(opts['depth_resolution']),
                                   disparity_space=bool(opts.get('disparity_space_sampling', False)),
                                   deterministic=deterministic, generator=generator)
        # Rays are independent, so on the CPU each image runs on its own: its per-sample
        # tensors (features, colours and their gradients, ~12 MB per image at small128) stay
        # below glibc's mmap threshold and reuse freed heap memory, where the batch's (~50 MB)
        # were mapped and page-faulted in afresh every time (-18% on a small128 generator
        # step). The random draws stay batched, so the output is the batch's, bit for bit;
        # density noise, drawn inside run_model, keeps the whole batch together.
        items = [slice(b, b + 1) for b in range(planes.shape[0])] if per_image(planes, opts) else [slice(None)]
        # One view per item (the texel table cache is tied to it), by split: its backward
        # writes the items' gradients into one gradient in the planes' layout, where each
        # slice's would zero-fill a gradient of the whole batch.
        item_planes = misc.split_keeping_gradient_layout(planes) if len(items) > 1 else [misc.keep_gradient_layout(planes)]
        caches = [{} for _ in items]                # both passes sample the same planes: one texel table per item
        coarse = [self._run_along_rays(p, decoder, ray_origins[i], ray_directions[i], depths[i], opts, generator, cache)
                  for i, p, cache in zip(items, item_planes, caches)]

        num_importance = int(opts['depth_resolution_importance'])
        if num_importance == 0:
            outputs = [self.ray_marcher(colors, densities, depths[i], opts) for i, (colors, densities) in zip(items, coarse)]
            return tuple(torch.cat(parts) for parts in zip(*outputs))
        with torch.no_grad():   # the importance depths are detached, so their weights need no graph
            coarse_weights = self.ray_marcher.interval_weights(torch.cat([densities for _, densities in coarse]), depths, opts)
        depths_fine = sample_importance(depths, coarse_weights, num_importance, deterministic=deterministic, generator=generator)
        outputs = []
        for i, p, cache, (colors, densities) in zip(items, item_planes, caches, coarse):
            colors_fine, densities_fine = self._run_along_rays(p, decoder, ray_origins[i], ray_directions[i], depths_fine[i],
                                                               opts, generator, cache)
            depths_sorted, order = sort_samples(torch.cat([depths[i], depths_fine[i]], dim=2))
            densities_sorted = gather_samples(torch.cat([densities, densities_fine], dim=2), order)
            weights = self.ray_marcher.interval_weights(densities_sorted, depths_sorted, opts)
            # The composite is a weighted sum over samples: move the per-sample weights back
            # to where the two passes left their colours instead of sorting the colours
            # (the widest tensors here) and back-propagating through that gather.
            sample_weights = self.ray_marcher.sample_weights(weights)
            sample_weights = torch.zeros_like(sample_weights).scatter(2, order.squeeze(-1), sample_weights)
            num_coarse = depths.shape[2]
            rgb = (self.ray_marcher.composite(colors, sample_weights[:, :, :num_coarse])
                   + self.ray_marcher.composite(colors_fine, sample_weights[:, :, num_coarse:]))
            outputs.append(self.ray_marcher.finish(rgb, weights, depths_sorted, opts))
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    def run_model(self, planes: torch.Tensor, decoder: torch.nn.Module, sample_coordinates: torch.Tensor,
                  sample_directions: torch.Tensor, options: dict, generator: Optional[torch.Generator] = None,
                  table_cache: Optional[dict] = None) -> dict:
        """Decoder output at arbitrary world points.

        Args:
            planes:             (B, 3, C, H, W).
            sample_coordinates: (B, M, 3) world points.
            sample_directions:  (B, M, 3) view directions (passed to the decoder).
            options:            reads `box_warp` and `density_noise` (default 0).
            generator:          torch.Generator for the density noise; None = the global one.
            table_cache:        {} shared by calls on the same planes (the sampler's CPU table
                                is built once; see ops.bilinear_mean), or None.
        Returns:
            dict(rgb=(B, M, C'), sigma=(B, M, 1)) with sigma the raw density.
        """
        if table_cache is None:     # (forward keeps the layout of the planes it splits, and its items share a cache)
            planes = misc.keep_gradient_layout(planes)    # grid_sample's backward writes a contiguous gradient
        decode_plane_mean = getattr(decoder, 'forward_plane_mean', None)
        if decode_plane_mean is not None:     # a decoder that reads only the planes' mean (OSGDecoder): the fused sampler
            out = decode_plane_mean(sample_plane_mean(planes, sample_coordinates, plane_axes=self.plane_axes,
                                                      box_warp=options['box_warp'], table_cache=table_cache), sample_directions)
        else:
            features = sample_from_planes(planes, sample_coordinates, plane_axes=self.plane_axes, box_warp=options['box_warp'])
            out = decoder(features, sample_directions)
        noise = float(options.get('density_noise', 0))
        if noise > 0:
            sigma = out['sigma']
            out['sigma'] = sigma + torch.randn(sigma.shape, generator=generator, device=sigma.device, dtype=sigma.dtype) * noise
        return out

    def _ray_limits(self, ray_origins, ray_directions, opts):
        """(B, N, 1) start and end depths: fixed, or the cube's entry and exit ('auto')."""
        start, end = opts['ray_start'], opts['ray_end']
        if isinstance(start, str) or isinstance(end, str):
            if not (start == 'auto' and end == 'auto'):
                raise ValueError(f'ImportanceRenderer: ray_start and ray_end must both be numbers or both be \'auto\', got {start!r}, {end!r}')
            start, end, valid = ray_box_intersection(ray_origins, ray_directions, float(opts['box_warp']))
            # Rays that miss the cube still need a range: use the union of the image's hits.
            any_valid = valid.any(dim=1, keepdim=True)
            lowest = torch.where(valid, start, torch.full_like(start, float('inf'))).amin(dim=1, keepdim=True)
            highest = torch.where(valid, end, torch.full_like(end, float('-inf'))).amax(dim=1, keepdim=True)
            start = torch.where(valid, start, torch.where(any_valid, lowest, torch.zeros_like(lowest)))
            end = torch.where(valid, end, torch.where(any_valid, highest, torch.ones_like(highest)))
            return start, end
        if not float(end) > float(start):
            raise ValueError(f'ImportanceRenderer: ray_end ({end}) must be greater than ray_start ({start})')
        shape = (*ray_origins.shape[:2], 1)
        return (torch.full(shape, float(start), device=ray_origins.device, dtype=ray_origins.dtype),
                torch.full(shape, float(end), device=ray_origins.device, dtype=ray_origins.dtype))

    def _run_along_rays(self, planes, decoder, ray_origins, ray_directions, depths, opts, generator=None, table_cache=None):
        """Decoder at the points origin + depth * direction: colours (B, N, S, C'), sigma (B, N, S, 1)."""
        batch_size, num_rays, num_samples, _ = depths.shape
        points = ray_points(ray_origins, ray_directions, depths)
        directions = ray_directions.unsqueeze(2).expand(-1, -1, num_samples, -1)
        out = self.run_model(planes, decoder, points.reshape(batch_size, -1, 3), directions.reshape(batch_size, -1, 3), opts, generator,
                             table_cache)
        colors = out['rgb'].reshape(batch_size, num_rays, num_samples, -1)
        densities = out['sigma'].reshape(batch_size, num_rays, num_samples, 1)
        return colors, densities
