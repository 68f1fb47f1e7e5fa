"""Volume rendering: ray sampler, ray marcher, importance sampling, tri-plane sampling, decoder."""

import math

import numpy as np
import pytest
import torch

from torch_utils import persistence
from training import coords
from training.networks_stylegan2 import FullyConnectedLayer
from training import triplane_decoder
from training.triplane_decoder import OSGDecoder
from training.volumetric_rendering.ray_marcher import MipRayMarcher2
from training.volumetric_rendering.ray_sampler import RaySampler
from training.volumetric_rendering.renderer import (ImportanceRenderer, ray_box_intersection, sample_from_planes,
                                                    sample_importance, sample_pdf, sample_plane_mean, sample_stratified,
                                                    gather_samples, ray_points, searchsorted_right, sort_samples)

# Written out by hand (not read from coords.PLANE_AXES) so a change there is caught.
EXPECTED_AXES = {
    'next3d': ((0, 1), (0, 2), (2, 1)),
    'eg3d': ((0, 1), (0, 2), (2, 0)),
}


def softplus(x):
    return math.log1p(math.exp(x))


def inverse_density(density):
    """Raw sigma whose activation softplus(sigma - 1) equals `density`."""
    return 1 + math.log(math.expm1(density))


def coordinate_planes(resolution, box_warp=1.0, plane_axes='next3d', dtype=torch.float64):
    """(1, 3, 3, R, R) planes whose texels hold the world coordinates of their centres:
    channel 0 = the column axis' coordinate, channel 1 = the row axis' coordinate,
    channel 2 = 1 (reads less than 1 only near or outside the box's faces)."""
    centres = ((torch.arange(resolution, dtype=dtype) + 0.5) / resolution * 2 - 1) * box_warp / 2
    rows, cols = torch.meshgrid(centres, centres, indexing='ij')
    plane = torch.stack([cols, rows, torch.ones_like(rows)])
    return plane.expand(1, 3, 3, resolution, resolution).clone()


# ----------------------------------------------------------------------------------------
# Ray sampler

def test_ray_sampler_frontal_camera():
    resolution = 5
    cam2world = coords.cam2world_look_at(torch.tensor([math.pi / 2]), torch.tensor([math.pi / 2]))
    origins, dirs = RaySampler()(cam2world, coords.intrinsics()[None], resolution)
    assert origins.shape == (1, 25, 3) and dirs.shape == (1, 25, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(1, 25), atol=1e-6, rtol=0)
    pivot = torch.tensor(coords.CAMERA_PIVOT)
    torch.testing.assert_close(origins[0, 0], pivot + torch.tensor([0, 0, coords.CAMERA_RADIUS]), atol=1e-5, rtol=0)
    # The centre pixel (row 2, column 2 -> ray 12) looks straight at the pivot.
    to_pivot = torch.nn.functional.normalize(pivot - origins[0, 12], dim=0)
    torch.testing.assert_close(dirs[0, 12], to_pivot, atol=1e-6, rtol=0)
    # Row-major order; OpenCV camera facing -z: columns go to +x (right), rows to -y (down).
    grid = dirs[0].reshape(resolution, resolution, 3)
    assert (grid[:, 1:, 0] > grid[:, :-1, 0]).all()
    assert (grid[1:, :, 1] < grid[:-1, :, 1]).all()
    # Pixel (row 0, column 4): centre at normalised (4.5 / 5, 0.5 / 5).
    f = coords.FOCAL_LENGTH
    expected = torch.tensor([(0.9 - 0.5) / f, -(0.1 - 0.5) / f, -1.0])
    torch.testing.assert_close(grid[0, 4], expected / expected.norm(), atol=1e-6, rtol=0)


def test_ray_sampler_general_camera_and_intrinsics():
    torch.manual_seed(1)
    cam2world = coords.cam2world_look_at(torch.tensor([1.2, 2.0]), torch.tensor([1.4, 1.7]))
    intr = torch.tensor([[[3.0, 0.1, 0.45], [0, 3.5, 0.55], [0, 0, 1]], [[5.0, 0, 0.5], [0, 5.0, 0.5], [0, 0, 1]]])
    resolution = 4
    _, dirs = RaySampler()(cam2world, intr, resolution)
    # Project every ray back through the camera: it must land on its pixel centre.
    cam_dirs = dirs @ cam2world[:, :3, :3]                      # world -> camera (R^T d)
    pix = (cam_dirs / cam_dirs[..., 2:]) @ intr.transpose(1, 2)
    j, i = np.meshgrid(np.arange(resolution), np.arange(resolution))
    expected = torch.tensor(np.stack([(j.ravel() + 0.5) / resolution, (i.ravel() + 0.5) / resolution], -1), dtype=torch.float32)
    torch.testing.assert_close(pix[..., :2], expected.expand(2, -1, -1), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------
# Ray marcher

def test_ray_marcher_three_samples_by_hand():
    depths = [1.0, 2.0, 4.0]
    sigmas = [0.5, 2.5, 1.5]
    colors = [[0.2, 0.4], [0.6, 0.0], [1.0, 1.0]]
    # Hand computation: two intervals with mid-point densities and colours.
    d0, d1 = softplus((0.5 + 2.5) / 2 - 1), softplus((2.5 + 1.5) / 2 - 1)
    a0, a1 = 1 - math.exp(-d0 * 1.0), 1 - math.exp(-d1 * 2.0)
    w0, w1 = a0, a1 * (1 - a0)
    c0, c1 = [0.4, 0.2], [0.8, 0.5]
    rgb = [w0 * c0[k] + w1 * c1[k] for k in range(2)]
    depth = (w0 * 1.5 + w1 * 3.0) / (w0 + w1)

    t = lambda x: torch.tensor(x, dtype=torch.float64)
    out_rgb, out_depth, weights = MipRayMarcher2()(
        t(colors).reshape(1, 1, 3, 2), t(sigmas).reshape(1, 1, 3, 1), t(depths).reshape(1, 1, 3, 1), dict(clamp_mode='softplus'))
    torch.testing.assert_close(weights.reshape(2), t([w0, w1]), atol=1e-9, rtol=0)
    torch.testing.assert_close(out_rgb.reshape(2), t([2 * v - 1 for v in rgb]), atol=1e-9, rtol=0)
    torch.testing.assert_close(out_depth.reshape(()), t(depth), atol=1e-9, rtol=0)

    white, _, _ = MipRayMarcher2()(
        t(colors).reshape(1, 1, 3, 2), t(sigmas).reshape(1, 1, 3, 1), t(depths).reshape(1, 1, 3, 1), dict(white_back=True))
    torch.testing.assert_close(white.reshape(2), t([2 * (v + 1 - w0 - w1) - 1 for v in rgb]), atol=1e-9, rtol=0)


def test_ray_marcher_empty_and_opaque_rays():
    depths = torch.tensor([2.0, 2.5, 3.0]).reshape(1, 1, 3, 1).repeat(1, 2, 1, 1)
    colors = torch.full((1, 2, 3, 3), 0.5)
    sigmas = torch.stack([torch.full((3, 1), -1e4), torch.full((3, 1), 1e4)]).unsqueeze(0)
    rgb, depth, weights = MipRayMarcher2()(colors, sigmas, depths, {})
    # Empty ray: no weight, black (-1), depth = far end (EG3D: nan -> inf -> clamp).
    assert weights[0, 0].sum() == 0
    torch.testing.assert_close(rgb[0, 0], torch.full((3,), -1.0))
    assert depth[0, 0, 0] == 3.0
    # Opaque ray: all weight in the first interval, depth at its mid-point.
    torch.testing.assert_close(weights[0, 1, :, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(rgb[0, 1], torch.zeros(3))
    torch.testing.assert_close(depth[0, 1, 0], torch.tensor(2.25))


def test_composite_gradients_and_transposed_incoming_gradient():
    colors = torch.rand(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 3, 5, dtype=torch.float64, requires_grad=True)
    composite = MipRayMarcher2.composite
    torch.testing.assert_close(composite(colors, weights), (colors * weights[..., None]).sum(2), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(composite, (colors, weights))
    assert torch.autograd.gradgradcheck(composite, (colors, weights))
    # The generator's gradient arrives as a transposed view: it must not make the batched
    # product's backward run one product per ray (tens of thousands of dispatched ops).
    from torch.profiler import ProfilerActivity, profile
    colors = torch.rand(1, 512, 24, 32, requires_grad=True)
    weights = torch.rand(1, 512, 24, requires_grad=True)
    grad = torch.randn(1, 32, 512).permute(0, 2, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        composite(colors, weights).backward(grad)
    assert sum(e.count for e in prof.key_averages()) < 200
    torch.testing.assert_close(colors.grad, weights[..., None] * grad[:, :, None, :])


def test_ray_marcher_rejects_bad_input():
    x = torch.zeros(1, 1, 3, 1)
    with pytest.raises(ValueError, match='clamp_mode'):
        MipRayMarcher2()(x, x, x, dict(clamp_mode='relu'))
    with pytest.raises(AssertionError, match='densities'):
        MipRayMarcher2()(x, torch.zeros(1, 1, 4, 1), x, {})


def test_ray_marcher_gradcheck():
    torch.manual_seed(0)
    colors = torch.rand(1, 2, 4, 2, dtype=torch.float64, requires_grad=True)
    sigmas = torch.randn(1, 2, 4, 1, dtype=torch.float64, requires_grad=True)
    depths = (torch.tensor([2.0, 2.3, 2.7, 3.2], dtype=torch.float64).reshape(1, 1, 4, 1).repeat(1, 2, 1, 1)).requires_grad_()
    fn = lambda c, s, d: MipRayMarcher2()(c, s, d, {})
    assert torch.autograd.gradcheck(fn, (colors, sigmas, depths))


# ----------------------------------------------------------------------------------------
# Tri-plane sampling

@pytest.mark.parametrize('plane_axes', ['next3d', 'eg3d'])
@pytest.mark.parametrize('box_warp', [1.0, 2.0])
def test_sample_from_planes_reads_world_coordinates(plane_axes, box_warp):
    resolution = 16
    planes = coordinate_planes(resolution, box_warp)
    # Points inside the outermost texel centres, where bilinear interpolation of a linear
    # function is exact.
    limit = box_warp / 2 * (1 - 1 / resolution)
    points = (torch.rand(1, 50, 3, dtype=torch.float64) * 2 - 1) * limit
    features = sample_from_planes(planes, points, plane_axes=plane_axes, box_warp=box_warp)
    assert features.shape == (1, 3, 50, 3)
    for k, (col_axis, row_axis) in enumerate(EXPECTED_AXES[plane_axes]):
        torch.testing.assert_close(features[0, k, :, 0], points[0, :, col_axis], atol=1e-12, rtol=0)
        torch.testing.assert_close(features[0, k, :, 1], points[0, :, row_axis], atol=1e-12, rtol=0)


def test_sample_from_planes_zero_outside_box_and_texel_centres():
    planes = torch.arange(3 * 4 * 4, dtype=torch.float64).reshape(1, 3, 1, 4, 4)
    # Texel (row 1, column 2) of a 4 x 4 plane has its centre at (u, v) = (0.125, -0.125).
    point = torch.tensor([[[0.125, -0.125, 0.375]]], dtype=torch.float64)
    features = sample_from_planes(planes, point, plane_axes='next3d')
    # plane0 (x, y): col x=0.125 -> 2, row y=-0.125 -> 1; plane1 (x, z): col 2, row z=0.375 -> 3;
    # plane2 (z, y): col 3, row 1.
    assert features.reshape(3).tolist() == [0 * 16 + 1 * 4 + 2, 1 * 16 + 3 * 4 + 2, 2 * 16 + 1 * 4 + 3]
    outside = sample_from_planes(planes, torch.tensor([[[0.0, 0.0, 3.0]]], dtype=torch.float64))
    assert outside[0, 0, 0, 0] != 0 and outside[0, 1, 0, 0] == 0 and outside[0, 2, 0, 0] == 0


def test_sample_from_planes_gradcheck():
    planes = torch.randn(1, 3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    points = ((torch.rand(1, 6, 3, dtype=torch.float64) * 2 - 1) * 0.4).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, x: sample_from_planes(p, x, plane_axes='next3d'), (planes, points))


@pytest.mark.parametrize('plane_axes, box_warp', [('next3d', 1.0), ('eg3d', 2.0)])
def test_sample_plane_mean_equals_grid_sample_mean(plane_axes, box_warp):
    # The CPU path (embedding_bag forward, index_add_ backward) against the
    # definition, for points inside, on texel centres and edges, just outside and far outside.
    torch.manual_seed(0)
    planes = torch.randn(2, 3, 5, 8, 8, dtype=torch.float64, requires_grad=True)
    points = (torch.rand(2, 200, 3, dtype=torch.float64) * 2 - 1) * 0.7 * box_warp
    half = box_warp / 2
    points[:, :6] = torch.tensor([[0.0, 0.0, 0.0], [half / 8, -half / 8, 3 * half / 8], [half, -half, half],
                                  [half * 1.05, 0.0, 0.0], [-half * 1.1, half * 1.2, -half * 0.99], [40.0, -30.0, 5.0]],
                                 dtype=torch.float64)
    assert points.shape[1] >= 8 * 8          # enough points for the fast path
    got = sample_plane_mean(planes, points, plane_axes=plane_axes, box_warp=box_warp)
    expected = sample_from_planes(planes, points, plane_axes=plane_axes, box_warp=box_warp).mean(1)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, planes, grad)[0], torch.autograd.grad(expected, planes, grad)[0],
                               atol=1e-12, rtol=0)
    assert got[:, 5].abs().max() == 0        # far outside: zero padding


def test_sample_plane_mean_fast_path_gradcheck():
    # The CPU path's own backward (index_add_ into the channels-last table) against finite
    # differences, with points inside, on the border texels and outside the planes.
    torch.manual_seed(1)
    planes = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    points = (torch.rand(2, 40, 3, dtype=torch.float64) * 2 - 1) * 0.6
    points[:, :3] = torch.tensor([[0.5, -0.5, 0.45], [0.52, 0.1, -0.2], [3.0, 0.0, 0.0]], dtype=torch.float64)
    assert points.shape[1] >= 4 * 5          # enough points for the fast path
    assert torch.autograd.gradcheck(lambda p: sample_plane_mean(p, points, plane_axes='next3d'), (planes,))


def test_renderer_fast_plane_mean_path_matches_per_plane_path():
    # OSGDecoder is fed by sample_plane_mean; the same decoder behind a module that only
    # has forward() gets the per-plane features: the renders and gradients must agree.
    class PerPlane(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, features, directions):
            return self.decoder(features, directions)

    torch.manual_seed(0)
    decoder = OSGDecoder(n_features=4, hidden_dim=8, decoder_output_dim=3).double()
    planes = (torch.randn(1, 3, 4, 4, 4, dtype=torch.float64) * 0.5).requires_grad_()
    origins = torch.tensor([[[0.05, -0.02, 1.0], [0.0, 0.1, 1.0]]], dtype=torch.float64)
    dirs = torch.nn.functional.normalize(torch.tensor([[[0.0, 0.0, -1.0], [0.1, 0.0, -1.0]]], dtype=torch.float64), dim=-1)
    opts = dict(ray_start=0.6, ray_end=1.4, box_warp=1.0, depth_resolution=8, depth_resolution_importance=8,
                deterministic_sampling=True)
    renderer = ImportanceRenderer()
    outs = [renderer(planes, d, origins, dirs, opts) for d in (decoder, PerPlane(decoder))]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    params = [planes] + list(decoder.parameters())
    grads = [torch.autograd.grad(rgb.sum() + depth.sum(), params) for rgb, depth, _ in outs]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------
# Depth sampling

def test_ray_box_intersection():
    origins = torch.tensor([[[0.0, 0.0, 2.0], [2.0, 2.0, 2.0], [0.1, 0.0, 0.0], [0.0, 0.0, 2.0]]])
    dirs = torch.tensor([[[0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.6, 0.0, -0.8]]])
    start, end, valid = ray_box_intersection(origins, dirs, 1.0)
    assert valid[0, :, 0].tolist() == [True, False, True, False]
    torch.testing.assert_close(start[0, [0, 2], 0], torch.tensor([1.5, 0.0]))   # inside: starts at the origin
    torch.testing.assert_close(end[0, [0, 2], 0], torch.tensor([2.5, 0.4]))
    start, end, valid = ray_box_intersection(origins[:, 3:], dirs[:, 3:], 4.0)  # enters z = 2 at 0, leaves x = 2 at 10/3
    torch.testing.assert_close(torch.cat([start, end]).reshape(2), torch.tensor([0.0, 2 / 0.6]))


def test_sample_stratified_as_eg3d():
    # EG3D: linspace(start, end, S) + u (end - start) / (S - 1), one u per sample.
    start, end = torch.full((1, 2, 1), 2.0), torch.full((1, 2, 1), 3.0)
    det = sample_stratified(start, end, 4, deterministic=True)             # u = 0.5
    torch.testing.assert_close(det[0, 0, :, 0], torch.tensor([2 + 1 / 6, 2.5, 2 + 5 / 6, 3 + 1 / 6]))
    # Disparity space: the same on [0, 1], then 1 / ((1 - s) / start + s / end).
    disparity = sample_stratified(start, end, 4, disparity_space=True, deterministic=True)
    s = torch.tensor([1 / 6, 1 / 2, 5 / 6, 7 / 6])
    torch.testing.assert_close(disparity[0, 1, :, 0], 1 / ((1 - s) / 2 + s / 3))
    # Random u from the given generator, drawn as (B, N, S, 1) like EG3D's rand_like.
    u = torch.rand(1, 2, 4, 1, generator=torch.Generator().manual_seed(7))
    jittered = sample_stratified(start, end, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(jittered, torch.tensor([2, 2 + 1 / 3, 2 + 2 / 3, 3]).reshape(1, 1, 4, 1) + u / 3)
    # Per-ray ranges ('auto'): each ray its own linspace.
    starts, ends = torch.tensor([[[2.0], [1.0]]]), torch.tensor([[[3.0], [4.0]]])
    det = sample_stratified(starts, ends, 3, deterministic=True)
    torch.testing.assert_close(det[0, :, :, 0], torch.tensor([[2.25, 2.75, 3.25], [1.75, 3.25, 4.75]]))
    with pytest.raises(ValueError, match='2 samples'):
        sample_stratified(start, end, 1)


def inverse_cdf_numpy(edges, weights, u):
    """Independent reference: the piecewise-linear CDF of `weights` (+ EG3D's eps 1e-5) on
    `edges`, inverted at u with np.interp."""
    mass = np.asarray(weights, np.float64) + 1e-5
    cdf = np.concatenate([[0], np.cumsum(mass / mass.sum())])
    return np.interp(u, cdf, np.asarray(edges, np.float64))


@pytest.mark.parametrize('num_entries', [1, 22, 255, 300])
def test_searchsorted_right_is_torchs(num_entries):
    """The CPU's count (up to 255 entries a row; torch's own above) equals torch.searchsorted
    with right=True: ties between entries, values equal to entries, below the first and
    above the last, float64 values against float32 rows."""
    gen = torch.Generator().manual_seed(num_entries)
    steps = torch.randint(0, 3, (40, num_entries), generator=gen).float() / 4          # zero steps: tied entries
    rows = torch.cumsum(steps, dim=1) - 1
    values = torch.cat([rows[:, torch.randint(0, num_entries, (6,), generator=gen)],          # on an entry
                        torch.rand(40, 10, generator=gen) * (rows[:, -1:] + 3) - 2], dim=1)   # in between, below, above
    want = torch.searchsorted(rows, values, right=True)
    got = searchsorted_right(rows, values)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(searchsorted_right(rows, values.double()), torch.searchsorted(rows.double(), values.double(), right=True))
    assert (want == 0).any() and (want == num_entries).any()


def test_sort_samples_is_torchs_and_gather_samples_is_gather():
    """The CPU's NumPy sort of the samples along each ray: torch.sort's sorted depths, an
    order that gathers them (tied depths may come in either order), NaN last; gather_samples
    is gather along the samples, forward and backward."""
    gen = torch.Generator().manual_seed(1)
    depths = torch.rand(2, 50, 48, 1, generator=gen)
    depths[0, :, 30:] = depths[0, :, :18]                         # ties between the two halves
    depths[1, 3, 5] = float('nan')
    got, order = sort_samples(depths)
    want, want_order = torch.sort(depths, dim=2)
    assert order.dtype == torch.int64 and order.shape == depths.shape
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(depths.gather(2, order), want, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(order.sort(dim=2).values, want_order.sort(dim=2).values)          # a permutation per ray
    assert torch.isnan(got[1, 3, -1]) and torch.equal(order[1], want_order[1])             # no ties in item 1
    half, half_order = sort_samples(depths.to(torch.bfloat16))         # torch's sort (NumPy has no bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, torch.sort(depths.to(torch.bfloat16), dim=2).values, atol=0, rtol=0, equal_nan=True)
    densities = torch.randn(2, 50, 48, 1, generator=gen, requires_grad=True)
    gathered = gather_samples(densities, order)
    assert torch.equal(gathered, densities.gather(2, order))
    gathered.backward(torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape))
    want_grad = torch.zeros_like(densities).scatter(2, order, torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape))
    assert torch.equal(densities.grad, want_grad)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_ray_points_are_origin_plus_depth_times_direction(dtype):
    """The CPU's coordinate-at-a-time points: bitwise the broadcast formula, with or without a graph."""
    gen = torch.Generator().manual_seed(0)
    origins, directions = torch.randn(2, 30, 3, generator=gen, dtype=dtype), torch.randn(2, 30, 3, generator=gen, dtype=dtype)
    depths = torch.rand(2, 30, 7, 1, generator=gen, dtype=dtype) + 2
    want = origins.unsqueeze(2) + depths * directions.unsqueeze(2)
    got = ray_points(origins, directions, depths)
    assert got.dtype == dtype and torch.equal(got, want)
    recorded = ray_points(origins.requires_grad_(), directions, depths)
    assert recorded.requires_grad and torch.equal(recorded.detach(), want)


def test_sample_pdf_inverts_the_cdf_with_eps():
    bins = torch.tensor([[0.0, 1.0, 3.0, 4.0, 4.5]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.0, 3.0, 2.0]], dtype=torch.float64)
    # The u it draws: torch.rand(M, n) from the generator.
    u = torch.rand(1, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    samples = sample_pdf(bins, weights, 12, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(samples[0].numpy(), inverse_cdf_numpy(bins[0], weights[0], u[0].numpy()), atol=1e-12, rtol=0)
    # Deterministic: evenly spaced quantiles (i + 0.5) / n.
    det = sample_pdf(bins, weights, 8, deterministic=True)[0].numpy()
    np.testing.assert_allclose(det, inverse_cdf_numpy(bins[0], weights[0], (np.arange(8) + 0.5) / 8), atol=1e-12, rtol=0)


def test_sample_pdf_distribution():
    bins = torch.tensor([[0.0, 1.0, 3.0, 4.0, 4.5]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.0, 3.0, 2.0]], dtype=torch.float64)
    n = 20000
    samples = np.sort(sample_pdf(bins.expand(2, -1), weights.expand(2, -1), n, generator=torch.Generator().manual_seed(3))[0].numpy())
    # Kolmogorov-Smirnov against the eps-adjusted CDF: sup |F_n - F| < 1.63 / sqrt(n) at the 1% level.
    mass = weights[0].numpy() + 1e-5
    cdf = lambda x: np.interp(x, bins[0].numpy(), np.concatenate([[0], np.cumsum(mass / mass.sum())]))
    ks = np.maximum(np.arange(1, n + 1) / n - cdf(samples), cdf(samples) - np.arange(n) / n).max()
    assert ks < 1.63 / math.sqrt(n), ks


def test_sample_importance_as_eg3d():
    # Coarse depths t (S = 6, uneven) and interval weights w (S - 1 = 5), computed by hand with numpy:
    depths = np.array([0.0, 1.0, 2.0, 4.0, 5.0, 7.0])
    w = np.array([0.0, 0.2, 0.7, 0.1, 0.0])
    # max-pool (kernel 2, stride 1, padding 1): S values; avg-pool (kernel 2, stride 1): S - 1; + 0.01.
    padded = np.concatenate([[-np.inf], w, [-np.inf]])
    pooled = np.maximum(padded[:-1], padded[1:])
    smoothed = (pooled[:-1] + pooled[1:]) / 2 + 0.01
    # The pdf lives on the mid-points of t, with the inner weights smoothed[1:-1] (S - 3 of
    # them): bins [mid_0, mid_1], ..., [mid_{S-4}, mid_{S-3}]; the last mid-point is unused.
    mids = (depths[:-1] + depths[1:]) / 2
    edges, inner = mids[:-1], smoothed[1:-1]
    np.testing.assert_allclose(inner, [0.46, 0.71, 0.41])
    t = torch.tensor(depths).reshape(1, 1, 6, 1)
    weights = torch.tensor(w).reshape(1, 1, 5, 1)
    n = 16
    fine = sample_importance(t, weights, n, deterministic=True)
    assert fine.shape == (1, 1, n, 1)
    np.testing.assert_allclose(fine[0, 0, :, 0].numpy(), inverse_cdf_numpy(edges, inner, (np.arange(n) + 0.5) / n), atol=1e-12, rtol=0)
    # Random u: torch.rand(B * N, n) from the generator.
    u = torch.rand(1, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fine = sample_importance(t, weights, n, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(fine[0, 0, :, 0].numpy(), inverse_cdf_numpy(edges, inner, u[0].numpy()), atol=1e-12, rtol=0)


def test_sample_importance_smooths_as_torchs_pooling_bit_for_bit():
    """The smoothing written as elementwise ops gives EG3D's max_pool1d + avg_pool1d values
    exactly (float32, random weights with zeros), so the fine depths are the same bits."""
    torch.manual_seed(0)
    depths = torch.sort(torch.rand(2, 300, 24, 1) * 2 + 2, dim=2)[0]
    weights = torch.rand(2, 300, 23, 1) * (torch.rand(2, 300, 23, 1) > 0.3)
    w = torch.nn.functional.max_pool1d(weights.reshape(600, 1, 23), kernel_size=2, stride=1, padding=1)
    w = torch.nn.functional.avg_pool1d(w, kernel_size=2, stride=1).squeeze(1) + 0.01
    t = depths.reshape(600, 24)
    mids = (t[:, :-1] + t[:, 1:]) / 2
    expected = sample_pdf(mids[:, :-1], w[:, 1:-1], 16, deterministic=True).reshape(2, 300, 16, 1)
    assert torch.equal(sample_importance(depths, weights, 16, deterministic=True), expected)


# ----------------------------------------------------------------------------------------
# Renderer

class SlabDecoder(torch.nn.Module):
    """Constant density and colour where z in [z_low, z_high] inside the box, nothing elsewhere.

    Reads z from coordinate planes (plane1's rows hold z), so it runs the renderer's real
    plane-sampling path; outside the box the planes read zeros, which channel 2 detects.
    """

    def __init__(self, z_low, z_high, density, color):
        super().__init__()
        self.z_low, self.z_high, self.sigma_in = z_low, z_high, inverse_density(density)
        self.color = color

    def forward(self, features, directions):
        z = features[:, 1, :, 1:2]                       # plane1 (x, z): row coordinate = z
        in_box = features[:, :, :, 2:3].amin(dim=1) > 1 - 1e-9
        inside = (z >= self.z_low) & (z <= self.z_high) & in_box
        sigma = torch.where(inside, torch.full_like(z, self.sigma_in), torch.full_like(z, -30.0))
        rgb = torch.tensor(self.color, dtype=z.dtype).expand(*z.shape[:2], -1)
        return dict(rgb=rgb, sigma=sigma)


@pytest.mark.parametrize('white_back,plane_axes', [(False, 'next3d'), (True, 'next3d'), (False, 'eg3d')])
def test_renderer_slab_matches_analytic_opacity_and_depth(white_back, plane_axes):
    z_low, z_high, density, color = -0.1, 0.2, 5.0, [0.3, 0.9]
    planes = coordinate_planes(64)
    cam2world = coords.cam2world_look_at(torch.tensor([math.pi / 2]), torch.tensor([math.pi / 2])).double()
    origins, dirs = RaySampler()(cam2world, coords.intrinsics()[None].double(), 4)
    num_samples, ray_start, ray_end = 512, 2.5, 3.3
    opts = dict(ray_start=ray_start, ray_end=ray_end, box_warp=1.0, depth_resolution=num_samples,
                depth_resolution_importance=0, deterministic_sampling=True, white_back=white_back)
    rgb, depth, weights = ImportanceRenderer(plane_axes)(planes, SlabDecoder(z_low, z_high, density, color), origins, dirs, opts)

    # Along a ray z = o_z + t d_z (d_z < 0): the slab spans t0..t1.
    o_z, d_z = origins[0, :, 2], dirs[0, :, 2]
    t0, t1 = (z_high - o_z) / d_z, (z_low - o_z) / d_z
    thickness = t1 - t0
    opacity = 1 - torch.exp(-density * thickness)
    mean_offset = 1 / density - thickness * torch.exp(-density * thickness) / opacity
    # Discretisation: an interval that straddles a face of the slab averages an inside and an
    # outside raw sigma and contributes ~nothing, so the sampled thickness lies in
    # [T - 2 d, T] (d = interval length along the ray, |d_z| > 0.99 here) and the opacity,
    # whose derivative in T is D exp(-D T), is right to within 2 d D exp(-D (T - 2 d)).
    interval = (ray_end - ray_start) / num_samples / 0.99
    tolerance = (2 * interval * density * torch.exp(-density * (thickness - 2 * interval))).max().item()
    torch.testing.assert_close(weights.sum(dim=2)[0, :, 0], opacity, atol=tolerance, rtol=0)
    torch.testing.assert_close(depth[0, :, 0], t0 + mean_offset, atol=2 * interval, rtol=0)
    expected_rgb = opacity[:, None] * torch.tensor(color, dtype=torch.float64)
    if white_back:
        expected_rgb = expected_rgb + (1 - opacity[:, None])
    torch.testing.assert_close(rgb[0], expected_rgb * 2 - 1, atol=2 * tolerance, rtol=0)


def test_renderer_importance_samples_concentrate_on_the_slab():
    z_low, z_high, density = -0.1, 0.2, 5.0
    planes = coordinate_planes(64)
    origins = torch.tensor([[[0.0, 0.0, 3.0]]], dtype=torch.float64)
    dirs = torch.tensor([[[0.0, 0.0, -1.0]]], dtype=torch.float64)
    decoder = SlabDecoder(z_low, z_high, density, [0.5])
    # Samples stay inside the box (z in [0.4, -0.3]), where the planes read z exactly.
    opts = dict(ray_start=2.6, ray_end=3.3, box_warp=1.0, depth_resolution=48, depth_resolution_importance=48,
                deterministic_sampling=True)
    renderer = ImportanceRenderer()
    rgb, depth, weights = renderer(planes, decoder, origins, dirs, opts)
    assert weights.shape == (1, 1, 95, 1)
    opacity = 1 - math.exp(-density * 0.3)
    assert abs(weights.sum().item() - opacity) < 0.03
    expected_depth = 2.8 + 1 / density - 0.3 * math.exp(-density * 0.3) / opacity
    assert abs(depth.item() - expected_depth) < 0.01
    # Where did the importance pass put its samples? Count fine samples inside the slab.
    coarse = sample_stratified(torch.full((1, 1, 1), 2.6, dtype=torch.float64), torch.full((1, 1, 1), 3.3, dtype=torch.float64),
                               48, deterministic=True)
    colors, sigmas = renderer._run_along_rays(planes, decoder, origins, dirs, coarse, opts)
    _, _, coarse_weights = renderer.ray_marcher(colors, sigmas, coarse, opts)
    fine = sample_importance(coarse, coarse_weights, 48, deterministic=True)
    in_slab = ((fine >= 2.8 - 0.03) & (fine <= 3.1 + 0.03)).float().mean().item()
    assert in_slab > 0.8, in_slab                           # the slab is 0.3 / 0.7 = 43% of the range


def test_importance_sampling_beats_stratified_on_a_thin_surface():
    # A thin dense slab (T = 0.02, D = 100, opacity 0.86), like a head's surface. With the same
    # budget of 96 samples per ray, 48 + 48 hierarchical samples land several samples on the
    # slab where 96 stratified ones (0.0074 apart) land two or three. Summed over 128 jittered
    # rays and the generator seeds 0-5, EG3D's sampling gave error ratios (hierarchical /
    # stratified) of 0.69 for the opacity and 0.31 for the depth (per seed: 0.44-1.05 and
    # 0.23-0.36: the depth gains on every seed, the opacity on average only).
    thickness, density, z_high = 0.02, 100.0, 0.05
    decoder = SlabDecoder(z_high - thickness, z_high, density, [0.5])
    origins = torch.tensor([[[0.0, 0.0, 3.0]]], dtype=torch.float64).expand(1, 128, 3)
    dirs = torch.tensor([[[0.0, 0.0, -1.0]]], dtype=torch.float64).expand(1, 128, 3)
    opacity = 1 - math.exp(-density * thickness)
    expected_depth = 3 - z_high + 1 / density - thickness * math.exp(-density * thickness) / opacity
    errors = torch.zeros(2, 2, dtype=torch.float64)          # (stratified, hierarchical) x (opacity, depth)
    for seed in range(6):
        for k, (coarse, fine) in enumerate([(96, 0), (48, 48)]):
            opts = dict(ray_start=2.6, ray_end=3.3, box_warp=1.0, depth_resolution=coarse, depth_resolution_importance=fine)
            _, depth, weights = ImportanceRenderer()(coordinate_planes(64), decoder, origins, dirs, opts,
                                                     generator=torch.Generator().manual_seed(seed))
            errors[k, 0] += (weights.sum(2) - opacity).abs().mean()
            errors[k, 1] += (depth - expected_depth).abs().mean()
    ratio = errors[1] / errors[0]
    assert ratio[0] < 0.85 and ratio[1] < 0.45, ratio


class DepthColourDecoder(torch.nn.Module):
    """Uniform density everywhere in the box; colour = z + 0.5 of the sample point, so a
    sample's colour says where it is (plane1's rows hold z)."""

    def forward(self, features, directions):
        z = features[:, 1, :, 1:2]
        return dict(rgb=z + 0.5, sigma=torch.full_like(z, inverse_density(2.0)))


def test_renderer_per_image_on_cpu_equals_the_batch(monkeypatch):
    # On the CPU the renderer runs image by image with the batch's random draws: the same
    # renders, depths, weights and gradients as one batched pass.
    from training.volumetric_rendering import renderer as renderer_mod
    torch.manual_seed(0)
    decoder = OSGDecoder(n_features=4, hidden_dim=8, decoder_output_dim=3)
    planes = (torch.randn(3, 3, 4, 8, 8) * 0.5).requires_grad_()
    origins = torch.tensor([0.0, 0.0, 1.0]).expand(3, 64, 3) + torch.randn(3, 64, 3) * 0.1
    dirs = torch.nn.functional.normalize(torch.tensor([0.0, 0.0, -1.0]) + torch.randn(3, 64, 3) * 0.1, dim=-1)
    opts = dict(ray_start=0.6, ray_end=1.4, box_warp=1.0, depth_resolution=6, depth_resolution_importance=5)
    renderer = ImportanceRenderer()
    results = []
    for split in (True, False):
        monkeypatch.setattr(renderer_mod, 'per_image', lambda planes, opts: split)
        out = renderer(planes, decoder, origins, dirs, opts, generator=torch.Generator().manual_seed(7))
        params = [planes] + list(decoder.parameters())
        results.append((out, torch.autograd.grad(out[0].square().sum() + out[1].sum(), params)))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    monkeypatch.undo()
    assert renderer_mod.per_image(planes, opts) and not renderer_mod.per_image(planes, dict(opts, density_noise=1.0))


@pytest.mark.parametrize('num_points', [64, 4])     # the fused table path, and grid_sample for few points
def test_renderer_gradient_keeps_the_planes_layout(num_points):
    # Planes viewed from a channels-last convolution's output (B, 3 C, H, W): the renderer's
    # per-image split and grid_sample's backward must not hand that convolution a contiguous
    # gradient (its backward in the other layout is 2-3x slower on the CPU).
    torch.manual_seed(0)
    decoder = OSGDecoder(n_features=4, hidden_dim=8, decoder_output_dim=3)
    conv_out = (torch.randn(2, 12, 6, 6) * 0.5).contiguous(memory_format=torch.channels_last).requires_grad_()
    planes = conv_out.view(2, 3, 4, 6, 6)
    opts = dict(ray_start=0.6, ray_end=1.4, box_warp=1.0, depth_resolution=6, depth_resolution_importance=5,
                deterministic_sampling=True)
    renderer = ImportanceRenderer()
    origins = torch.tensor([0.0, 0.0, 1.0]).expand(2, num_points, 3) + torch.randn(2, num_points, 3) * 0.1
    dirs = torch.nn.functional.normalize(torch.tensor([0.0, 0.0, -1.0]) + torch.randn(2, num_points, 3) * 0.1, dim=-1)
    rgb, depth, _ = renderer(planes, decoder, origins, dirs, opts)
    grad, = torch.autograd.grad(rgb.square().sum() + depth.sum(), conv_out)
    points = torch.rand(2, num_points, 3) * 2 - 1
    grad_query, = torch.autograd.grad(renderer.run_model(planes, decoder, points, points, opts)['sigma'].sum(), conv_out)
    plain = conv_out.detach().contiguous().requires_grad_()
    rgb_ref, depth_ref, _ = renderer(plain.view(2, 3, 4, 6, 6), decoder, origins, dirs, opts)
    ref, = torch.autograd.grad(rgb_ref.square().sum() + depth_ref.sum(), plain)
    for g in (grad, grad_query):
        assert g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()
    torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)


def test_renderer_keeps_colours_with_their_depths():
    # A ray down the z axis from z = 3: a sample at depth t has colour 3.5 - t, so the
    # composite of mid-point colours is sum_j w_j (3.5 - tmid_j) = opacity * (3.5 - depth)
    # exactly, whatever the depths, if every colour stays with its depth through the merge
    # and sort of the coarse and importance samples.
    origins = torch.tensor([[[0.0, 0.0, 3.0], [0.05, -0.1, 3.0]]], dtype=torch.float64)
    dirs = torch.tensor([[[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]]], dtype=torch.float64)
    opts = dict(ray_start=2.6, ray_end=3.3, box_warp=1.0, depth_resolution=12, depth_resolution_importance=12)
    rgb, depth, weights = ImportanceRenderer()(coordinate_planes(64), DepthColourDecoder(), origins, dirs, opts,
                                               generator=torch.Generator().manual_seed(0))
    assert weights.shape == (1, 2, 23, 1)
    opacity = weights.sum(2)
    torch.testing.assert_close((rgb + 1) / 2, opacity * (3.5 - depth), atol=1e-12, rtol=0)


def test_renderer_generator_makes_sampling_reproducible():
    torch.manual_seed(0)
    decoder = OSGDecoder(n_features=2, hidden_dim=8, decoder_output_dim=3).double()
    planes = torch.randn(1, 3, 2, 8, 8, dtype=torch.float64)
    origins = torch.tensor([[[0.05, -0.02, 1.0], [0.0, 0.1, 1.0]]], dtype=torch.float64)
    dirs = torch.nn.functional.normalize(torch.tensor([[[0.0, 0.0, -1.0], [0.1, 0.0, -1.0]]], dtype=torch.float64), dim=-1)
    opts = dict(ray_start=0.6, ray_end=1.4, box_warp=1.0, depth_resolution=8, depth_resolution_importance=8, density_noise=0.5)
    renderer = ImportanceRenderer()
    state = torch.get_rng_state()
    first = renderer(planes, decoder, origins, dirs, opts, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)          # the global generator is left alone
    torch.rand(10)                                             # whatever it does meanwhile
    again = renderer(planes, decoder, origins, dirs, opts, generator=torch.Generator().manual_seed(1))
    other = renderer(planes, decoder, origins, dirs, opts, generator=torch.Generator().manual_seed(2))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_renderer_auto_range_and_option_errors():
    planes = coordinate_planes(16)
    decoder = SlabDecoder(-0.1, 0.2, 5.0, [0.5])
    origins = torch.tensor([[[0.0, 0.0, 3.0], [5.0, 5.0, 3.0]]], dtype=torch.float64)
    dirs = torch.tensor([[[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]]], dtype=torch.float64)
    opts = dict(ray_start='auto', ray_end='auto', box_warp=1.0, depth_resolution=64, depth_resolution_importance=0,
                deterministic_sampling=True)
    _, depth, weights = ImportanceRenderer()(planes, decoder, origins, dirs, opts)
    # The hitting ray samples only the box, [2.5, 3.5]: 64 samples there resolve the slab
    # (depths 2.8 to 3.1) to within 2 intervals; the missing ray borrows that range and stays empty.
    opacity = 1 - math.exp(-5.0 * 0.3)
    expected_depth = 2.8 + 1 / 5.0 - 0.3 * math.exp(-5.0 * 0.3) / opacity
    assert abs(depth[0, 0, 0].item() - expected_depth) < 2 / 64
    assert abs(weights[0, 0].sum().item() - opacity) < 2 / 64 * 5.0
    assert weights[0, 1].sum() < 1e-10 and 2.5 <= depth[0, 1, 0] <= 3.5
    with pytest.raises(ValueError, match='both'):
        ImportanceRenderer()(planes, decoder, origins, dirs, dict(opts, ray_end=3.3))
    with pytest.raises(ValueError, match='greater'):
        ImportanceRenderer()(planes, decoder, origins, dirs, dict(opts, ray_start=3.0, ray_end=2.0))
    with pytest.raises(ValueError, match='depth_resolution_importance'):
        ImportanceRenderer()(planes, decoder, origins, dirs, {k: v for k, v in opts.items() if k != 'depth_resolution_importance'})
    with pytest.raises(ValueError, match='plane_axes'):
        ImportanceRenderer(plane_axes='xy')
    restored = persistence.module_from_dict(persistence.module_to_dict(ImportanceRenderer(plane_axes='eg3d')))
    assert restored.plane_axes == 'eg3d'
    with pytest.raises(ValueError, match='positive'):
        RaySampler()(torch.eye(4)[None], torch.eye(3)[None], 0)


def test_renderer_gradients_reach_planes_and_decoder():
    torch.manual_seed(0)
    decoder = OSGDecoder(n_features=2, hidden_dim=8, decoder_output_dim=3).double()
    planes = (torch.randn(1, 3, 2, 4, 4, dtype=torch.float64) * 0.5).requires_grad_()
    origins = torch.tensor([[[0.05, -0.02, 1.0], [0.0, 0.1, 1.0]]], dtype=torch.float64)
    dirs = torch.nn.functional.normalize(torch.tensor([[[0.0, 0.0, -1.0], [0.1, 0.0, -1.0]]], dtype=torch.float64), dim=-1)
    opts = dict(ray_start=0.6, ray_end=1.4, box_warp=1.0, depth_resolution=6, depth_resolution_importance=0,
                deterministic_sampling=True)
    renderer = ImportanceRenderer()
    fn = lambda p: renderer(p, decoder, origins, dirs, opts)[:2]
    assert torch.autograd.gradcheck(fn, (planes,))
    # With importance sampling the gradient still reaches every decoder parameter.
    rgb, depth, _ = renderer(planes, decoder, origins, dirs, dict(opts, depth_resolution_importance=6))
    (rgb.sum() + depth.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    assert planes.grad.abs().sum() > 0


def test_run_model_density_noise():
    planes = coordinate_planes(8)
    decoder = SlabDecoder(-0.1, 0.2, 5.0, [0.5])
    points = torch.zeros(1, 1000, 3, dtype=torch.float64)
    clean = ImportanceRenderer().run_model(planes, decoder, points, points, dict(box_warp=1.0))
    noisy = ImportanceRenderer().run_model(planes, decoder, points, points, dict(box_warp=1.0, density_noise=0.5))
    assert clean['sigma'].shape == (1, 1000, 1) and clean['rgb'].shape == (1, 1000, 1)
    assert abs((noisy['sigma'] - clean['sigma']).std().item() - 0.5) < 0.05


# ----------------------------------------------------------------------------------------
# Decoder

def test_widened_sigmoid_is_eg3d_formula_bit_for_bit():
    from training.triplane_decoder import widened_sigmoid
    x = torch.randn(300, 33) * 8
    expected = torch.sigmoid(x[:, 1:]) * (1 + 2 * 0.001) - 0.001      # EG3D's OSGDecoder
    assert torch.equal(widened_sigmoid(x[:, 1:]), expected)
    out = torch.empty(300, 32)
    assert widened_sigmoid(x[:, 1:], out=out) is out and torch.equal(out, expected)
    assert expected.min() < -0.0009 and expected.max() > 1.0009


def test_decoder_parameter_count_and_output():
    decoder = OSGDecoder()
    assert sum(p.numel() for p in decoder.parameters()) == 4257
    features = torch.randn(2, 3, 10, 32) * 10
    out = decoder(features, torch.zeros(2, 10, 3))
    assert out['rgb'].shape == (2, 10, 32) and out['sigma'].shape == (2, 10, 1)
    assert out['rgb'].min() >= -0.001 and out['rgb'].max() <= 1.001
    # Only the mean of the three planes matters.
    shuffled = features[:, [2, 0, 1]]
    torch.testing.assert_close(decoder(shuffled, None)['sigma'], out['sigma'])


def _decoder_reference(decoder, features):
    """OSGDecoder's layers as plain modules (its path off the CPU): sigma, rgb."""
    out = decoder.net(features.reshape(-1, features.shape[-1]))
    return out[:, :1], torch.sigmoid(out[:, 1:]) * 1.002 - 0.001


def test_decoder_cpu_path_matches_module_path():
    # The CPU decoder runs a few thousand points at a time, forward and backward (its own
    # backward): the same values and gradients as the layers run as modules by autograd.
    torch.manual_seed(0)
    decoder = OSGDecoder(n_features=5, hidden_dim=7, decoder_output_dim=3, decoder_lr_mul=0.5).double()
    features = (torch.randn(2, 10000, 5, dtype=torch.float64) * 3).requires_grad_()   # several chunks, the last partial
    features.data[0, :5] *= 10                                                     # softplus past its linear threshold
    got = decoder.forward_plane_mean(features, None)
    sigma, rgb = _decoder_reference(decoder, features)
    torch.testing.assert_close(got['sigma'].reshape(-1, 1), sigma, atol=1e-12, rtol=0)
    torch.testing.assert_close(got['rgb'].reshape(-1, 3), rgb, atol=1e-12, rtol=0)
    grad_sigma, grad_rgb = torch.randn_like(sigma), torch.randn_like(rgb)
    params = [features] + list(decoder.parameters())
    got_grads = torch.autograd.grad([got['sigma'].reshape(-1, 1), got['rgb'].reshape(-1, 3)], params, [grad_sigma, grad_rgb],
                                    retain_graph=True)
    ref_grads = torch.autograd.grad([sigma, rgb], params, [grad_sigma, grad_rgb], retain_graph=True)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-12)
    # Only sigma used (the density regularisation), planes frozen: the parameters' gradients alone.
    got_grads = torch.autograd.grad(got['sigma'].sum(), list(decoder.parameters()), retain_graph=True)
    ref_grads = torch.autograd.grad(sigma.sum(), list(decoder.parameters()))
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-12)
    with torch.no_grad():
        without = decoder.forward_plane_mean(features, None)
    assert not without['rgb'].requires_grad
    torch.testing.assert_close(without['rgb'], got['rgb'].detach(), atol=0, rtol=0)


def test_decoder_cpu_path_gradcheck(monkeypatch):
    monkeypatch.setattr(triplane_decoder._DecodeCPU, 'CHUNK', 4)     # 3 chunks, the last partial
    torch.manual_seed(0)
    decoder = OSGDecoder(n_features=3, hidden_dim=4, decoder_output_dim=2).double().requires_grad_(True)
    features = torch.randn(1, 10, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: tuple(decoder.forward_plane_mean(f, None).values()), (features,))
    assert torch.autograd.gradcheck(
        lambda f, w1, b1, w2, b2: triplane_decoder._DecodeCPU.apply(f.reshape(-1, 3), w1, b1, w2, b2, True),
        (features, torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True),
         torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)))


@pytest.mark.parametrize('log_exp', [False, True])
def test_decoder_cpu_softplus_matches_torch(monkeypatch, log_exp):
    """The decoder's softplus, both formulas (the CPU's vendor picks one): log1p(exp2) within
    1e-6 of float64's from -20 up to 88 (torch's own float32 is within 1.2e-7), within 1e-14
    below; log(1 + exp) within 1.3e-7 max(1, softplus), 0 below -17 (within 4.2e-8). Above
    torch's threshold of 20 both within 2e-7 of torch's identity; inf where e^x overflows
    float32, NaN for NaN; in place or not, with a bias added in its first pass or not."""
    monkeypatch.setattr(triplane_decoder.misc, 'mkl_vector_math_fast', lambda: log_exp)
    x = torch.linspace(-60, 88, 200001, dtype=torch.float32)
    exact = torch.nn.functional.softplus(x.double())
    got = triplane_decoder.softplus_cpu(x, torch.empty_like(x))
    error = (got.double() - exact).abs()
    if log_exp:
        assert (error / exact.clamp(min=1)).max() < 1.3e-7
        assert (error[x < -17]).max() < 4.2e-8 and (got[x < -17.5] == 0).all()
    else:
        assert (error / exact)[x >= -20].max() < 1e-6
        assert error[x < -20].max() < 1e-14
    torch.testing.assert_close(got, triplane_decoder.softplus_cpu(x, torch.empty_like(x), log_exp=log_exp), atol=0, rtol=0)
    above = x > 20
    assert ((got - x).abs() / x)[above].max() < 2e-7          # torch's float32 softplus is x itself there
    in_place = x.clone()
    assert triplane_decoder.softplus_cpu(in_place, in_place) is in_place
    torch.testing.assert_close(in_place, got, atol=0, rtol=0)
    # The bias (along the last dimension) in the first pass: softplus(pre + bias), also in place.
    pre = x[:199680].reshape(-1, 64) - 0.5
    bias = torch.linspace(-0.5, 0.5, 64)
    exact = torch.nn.functional.softplus(pre.double() + bias.double())
    keep = pre + bias >= -20
    for out in (torch.empty_like(pre), pre.clone()):
        with_bias = triplane_decoder.softplus_cpu(pre if out.data_ptr() != pre.data_ptr() else out, out, bias=bias)
        assert with_bias is out
        error = (with_bias.double() - exact).abs()
        if log_exp:             # pre + bias rounds to float32 first: half an ulp more
            assert (error / exact.clamp(min=1))[keep].max() < 2e-7
        else:
            assert (error / exact)[keep].max() < 1e-6
    # Past float32's exp: inf (the decoder redoes those with torch's softplus), NaN stays NaN.
    y = torch.tensor([-200.0, float('-inf'), 0.0, 88.0, 89.0, float('inf'), float('nan')])
    got = triplane_decoder.softplus_cpu(y, torch.empty_like(y))
    assert got[0] == 0 and got[1] == 0 and abs(got[2] - math.log(2)) < 1e-7 and abs(got[3] - 88) < 1e-5
    assert got[4] == float('inf') and got[5] == float('inf') and got[6].isnan()
    assert triplane_decoder.softplus_cpu(torch.empty(0), torch.empty(0)).shape == (0,)


@pytest.mark.parametrize('keep', [False, True])
def test_decoder_cpu_redoes_overflowing_chunks_with_torchs_softplus(monkeypatch, keep):
    """Chunks whose softplus overflowed (pre-activations above ~88.7) or met a NaN get torch's
    softplus: the same outputs as the layers run as modules, finite where those are; the
    other chunks keep the fast formula (torch's softplus runs for the two bad chunks only)."""
    monkeypatch.setattr(triplane_decoder._DecodeCPU, 'CHUNK', 8)
    torch_softplus = torch.ops.aten.softplus.out
    calls = []
    monkeypatch.setattr(triplane_decoder.torch.ops.aten.softplus, 'out', lambda *a, **k: calls.append(1) or torch_softplus(*a, **k))
    torch.manual_seed(0)
    decoder = OSGDecoder(n_features=4, hidden_dim=6, decoder_output_dim=3)
    features = torch.randn(1, 40, 4)
    features[0, 3] = 400.0                     # chunk 0: pre-activations far past e^x's float32 range
    features[0, 21, 1] = float('nan')          # chunk 2: a NaN
    with torch.set_grad_enabled(keep):
        got = decoder.forward_plane_mean(features.requires_grad_(keep), None)
        sigma, rgb = _decoder_reference(decoder, features)
    assert len(calls) == 2
    finite = torch.ones(40, dtype=torch.bool)
    finite[21] = False
    assert torch.isfinite(got['sigma'][0, finite]).all() and got['sigma'][0, 21].isnan()
    torch.testing.assert_close(got['sigma'].reshape(-1, 1), sigma, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got['rgb'].reshape(-1, 3), rgb, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_decoder_matches_explicit_mlp():
    decoder = OSGDecoder(n_features=5, hidden_dim=7, decoder_output_dim=2, decoder_lr_mul=0.25).double()
    features = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    fc0, fc2 = decoder.net[0], decoder.net[2]
    # Equalised learning rate: effective weight = stored * lr_mul / sqrt(fan_in), bias = stored * lr_mul.
    h = features.mean(1) @ (fc0.weight * 0.25 / math.sqrt(5)).T + fc0.bias * 0.25
    out = torch.nn.functional.softplus(h) @ (fc2.weight * 0.25 / math.sqrt(7)).T + fc2.bias * 0.25
    result = decoder(features, None)
    torch.testing.assert_close(result['sigma'], out[..., :1])
    torch.testing.assert_close(result['rgb'], torch.sigmoid(out[..., 1:]) * 1.002 - 0.001)
    # Stored weights are N(0, 1) / lr_mul, so the effective initial weights do not depend on lr_mul.
    layer = FullyConnectedLayer(1000, 100, lr_multiplier=0.01)
    assert abs(layer.weight.std().item() * 0.01 - 1) < 0.02


def test_decoder_checkpoint_round_trip():
    decoder = OSGDecoder(decoder_lr_mul=0.5)
    restored = persistence.module_from_dict(persistence.module_to_dict(decoder))
    assert isinstance(restored, OSGDecoder) and restored.init_kwargs['decoder_lr_mul'] == 0.5
    features = torch.randn(1, 3, 4, 32)
    torch.testing.assert_close(restored(features, None)['rgb'], decoder(features, None)['rgb'])


@pytest.mark.gpu
def test_renderer_and_mouth_on_cuda_match_cpu():
    torch.manual_seed(0)
    from training.mouth import crop_mouth, paste_mouth
    decoder = OSGDecoder()
    planes = torch.randn(2, 3, 32, 32, 32) * 0.5
    cam2world = coords.cam2world_look_at(torch.tensor([1.4, 1.7]), torch.tensor([1.5, 1.6]))
    origins, dirs = RaySampler()(cam2world, coords.intrinsics().expand(2, 3, 3), 8)
    opts = dict(ray_start=2.25, ray_end=3.3, box_warp=1.0, depth_resolution=24, depth_resolution_importance=24,
                deterministic_sampling=True)
    cpu = ImportanceRenderer()(planes, decoder, origins, dirs, opts)
    gpu = ImportanceRenderer()(planes.cuda(), decoder.cuda(), origins.cuda(), dirs.cuda(), opts)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
    front, patch = torch.rand(2, 4, 64, 64), torch.rand(2, 4, 16, 16)
    box = torch.tensor([[20, 30, 20], [4, 8, 33]])
    cuda = [t.cuda() for t in (front, patch, box, planes, origins, dirs)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')                   # no host sync in the mouth or the seeded renderer
    try:
        gpu_crop = crop_mouth(cuda[0], cuda[2], 16)
        gpu_paste = paste_mouth(cuda[0], cuda[1], cuda[2])
        opts = dict(opts, deterministic_sampling=False)
        seeded = [ImportanceRenderer()(cuda[3], decoder, cuda[4], cuda[5], opts, generator=torch.Generator('cuda').manual_seed(3))
                  for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.testing.assert_close(gpu_crop.cpu(), crop_mouth(front, box, 16), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gpu_paste.cpu(), paste_mouth(front, patch, box), atol=1e-5, rtol=1e-5)
    for a, b in zip(*seeded):
        assert torch.equal(a, b)


@pytest.mark.parametrize('plane_axes', sorted(coords.PLANE_AXES))
@pytest.mark.parametrize('dtype, key', [(torch.float32, 'coords.plane_selection.{}.0.7.torch.float32'),
                                        (torch.float64, 'coords.plane_selection.{}.0.7.torch.float64'),
                                        (torch.float16, 'coords.plane_axes.{}')])
def test_project_onto_planes_picks_each_planes_axes(plane_axes, dtype, key):
    """Plane k's grid point is the point's coordinates on the axes PLANE_AXES[k], scaled by
    2 / box_warp, to the bit (on the CPU in float32 and float64 as a product with a selection
    matrix, else a gather); that matrix or index is made once per device, not on every call."""
    pts = (torch.randn(2, 7, 3) * 0.6).to(dtype)
    grid = coords.project_onto_planes(pts, plane_axes=plane_axes, box_warp=0.7)
    assert grid.shape == (2, 3, 7, 2) and grid.dtype == dtype
    for k, (a, b) in enumerate(coords.PLANE_AXES[plane_axes]):
        assert torch.equal(grid[:, k], torch.stack([pts[..., a], pts[..., b]], dim=-1) * (2 / 0.7))
    from torch_utils import misc
    key = (key.format(plane_axes), pts.device)
    made = misc._device_constants[key]
    coords.project_onto_planes(pts, plane_axes=plane_axes, box_warp=0.7)
    assert misc._device_constants[key] is made
    # Points that record a graph take the gather: their gradient sums only the two planes' terms.
    pts.requires_grad_(True)
    upstream = torch.randn(2, 3, 7, 2).to(dtype)
    upstream[0, 0, 0, 0] = float('inf')
    coords.project_onto_planes(pts, plane_axes=plane_axes, box_warp=0.7).backward(upstream)
    want = torch.zeros_like(pts)
    for k, (a, b) in enumerate(coords.PLANE_AXES[plane_axes]):
        want[..., a] += upstream[:, k, :, 0] * (2 / 0.7)
        want[..., b] += upstream[:, k, :, 1] * (2 / 0.7)
    tolerance = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(pts.grad, want, **tolerance)
    assert torch.isfinite(pts.grad[0, 0]).sum() == 2                # the inf reaches one coordinate only
