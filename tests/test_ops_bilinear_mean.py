"""bilinear_mean: the CPU table path against grid_sample (values, gradients), finite differences, fallbacks."""

import functools
import platform

import pytest
import torch
import torch.nn.functional as F

from torch_utils.ops import bilinear_mean as BM


def grid_sample_mean(images, grid):
    """The definition: per image grid_sample (bilinear, zeros, align_corners=False), mean over images, points first."""
    samples = [F.grid_sample(images[:, p], grid[:, p, None], mode='bilinear', padding_mode='zeros', align_corners=False)[:, :, 0]
               for p in range(images.shape[1])]
    return torch.stack(samples, dim=1).mean(dim=1).transpose(1, 2)


def make_grid(batch, num_images, num_points, seed=0):
    """Points inside, on texel centres and edges, just outside and far outside [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    grid = (torch.rand(batch, num_images, num_points, 2, generator=g, dtype=torch.float64) * 2 - 1) * 1.3
    grid[:, :, :6] = torch.tensor([[0.0, 0.0], [1 / 8, -3 / 8], [1.0, -1.0], [-1.0, 1.0], [1.02, 0.3], [-40.0, 25.0]],
                                  dtype=torch.float64)
    return grid


BACKWARDS = {'sparse': 10 ** 6, 'index_add': 0}      # SPARSE_MAX_THREADS that picks each backward


def spy_on_scatters(monkeypatch) -> list:
    """Record which scatter each backward calls (their names, in order)."""
    calls = []
    for name in ('scatter_rows_sparse', 'scatter_rows_index_add'):
        function = getattr(BM, name)
        monkeypatch.setattr(BM, name, lambda *args, _f=function, _n=name, **kwargs: calls.append(_n) or _f(*args, **kwargs))
    return calls


@pytest.mark.parametrize('backward', sorted(BACKWARDS))
@pytest.mark.parametrize('num_images', [1, 3])
def test_cpu_path_equals_grid_sample_mean(monkeypatch, num_images, backward):
    monkeypatch.setattr(BM._BilinearMeanCPU, 'SPARSE_MAX_THREADS', BACKWARDS[backward])
    torch.manual_seed(0)
    images = torch.randn(2, num_images, 5, 8, 6, dtype=torch.float64, requires_grad=True)
    grid = make_grid(2, num_images, 120)
    assert grid.shape[2] >= 8 * 6                # enough points for the table path
    got = BM.bilinear_mean(images, grid)
    expected = grid_sample_mean(images, grid)
    assert got.shape == (2, 120, 5)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert got[:, 5].abs().max() == 0            # far outside: zero padding
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, images, grad)[0], torch.autograd.grad(expected, images, grad)[0],
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize('backward', sorted(BACKWARDS))
@pytest.mark.parametrize('num_images', [1, 3])
def test_cpu_path_gradcheck(monkeypatch, num_images, backward):
    monkeypatch.setattr(BM._BilinearMeanCPU, 'SPARSE_MAX_THREADS', BACKWARDS[backward])
    # Several index_add_ chunks, the last partial.
    monkeypatch.setattr(BM, 'scatter_rows_index_add', functools.partial(BM.scatter_rows_index_add, chunk=7))
    images = torch.randn(2, num_images, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    grid = make_grid(2, num_images, 30, seed=1)
    assert torch.autograd.gradcheck(lambda im: BM.bilinear_mean(im, grid), (images,))


@pytest.mark.parametrize('threads', [1, 2])
def test_the_two_backwards_agree_to_the_bit(monkeypatch, threads):
    # float32, as in training: both add each texel's terms point by point, bags in order.
    # To the bit on x86-64, where SciPy's product makes no fused multiply-add; elsewhere to rounding.
    torch.manual_seed(1)
    images = torch.randn(2, 3, 8, 16, 12, requires_grad=True)
    grid = make_grid(2, 3, 700, seed=6).float() * 0.8       # many points per texel: texels summed from many terms
    grad = torch.randn(2, 700, 8)
    calls = spy_on_scatters(monkeypatch)
    grads = {}
    torch.set_num_threads(threads)                              # (conftest restores it)
    for name, limit in BACKWARDS.items():
        monkeypatch.setattr(BM._BilinearMeanCPU, 'SPARSE_MAX_THREADS', limit)
        grads[name], = torch.autograd.grad(BM.bilinear_mean(images, grid), images, grad)
    assert calls == ['scatter_rows_sparse', 'scatter_rows_index_add']
    if platform.machine().lower() in ('x86_64', 'amd64'):
        assert torch.equal(grads['sparse'], grads['index_add'])
    else:
        torch.testing.assert_close(grads['sparse'], grads['index_add'], atol=1e-6, rtol=1e-6)
    assert grads['sparse'].dtype == torch.float32 and grads['sparse'].abs().max() > 0
    expected, = torch.autograd.grad(grid_sample_mean(images, grid), images, grad)
    torch.testing.assert_close(grads['sparse'], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('threads', [1, 2, 4, 5])
def test_the_backward_takes_the_sparse_product_up_to_its_thread_limit(monkeypatch, threads):
    assert BM._BilinearMeanCPU.SPARSE_MAX_THREADS == 4
    calls = spy_on_scatters(monkeypatch)
    images = torch.randn(1, 3, 4, 8, 6, requires_grad=True)
    grid = make_grid(1, 3, 60, seed=7).float()
    torch.set_num_threads(threads)                              # (conftest restores it)
    BM.bilinear_mean(images, grid).sum().backward()
    assert calls == ['scatter_rows_sparse' if threads <= 4 else 'scatter_rows_index_add']


def test_sparse_scatter_takes_int64_indices():
    # The table path's int64 texel indices (tables of 2^31 values or more): the same table.
    torch.manual_seed(2)
    rows, weights = torch.randn(50, 3), torch.rand(50, 4)
    texel = torch.randint(0, 20, (50, 4), dtype=torch.int32)
    table = BM.scatter_rows_sparse(rows, texel, weights, 20)
    assert table.shape == (20, 3) and table.dtype == torch.float32
    assert torch.equal(BM.scatter_rows_sparse(rows, texel.long(), weights, 20), table)
    expected = torch.zeros(20, 3).index_add_(0, texel.reshape(-1).long(), (weights[:, :, None] * rows[:, None]).reshape(-1, 3))
    torch.testing.assert_close(table, expected, atol=1e-6, rtol=1e-6)


def test_table_cache_builds_the_table_once(monkeypatch):
    # The renderer's two passes sample the same planes: one table, the same values and gradients.
    images = torch.randn(2, 3, 5, 8, 6, dtype=torch.float64, requires_grad=True)
    grids = [make_grid(2, 3, 90, seed=s) for s in (2, 3)]
    builds = []
    build = BM._texel_table
    monkeypatch.setattr(BM, '_texel_table', lambda im: builds.append(1) or build(im))
    cache = {}
    got = [BM.bilinear_mean(images, g, table_cache=cache) for g in grids]
    assert len(builds) == 1 and cache['images'] is images
    expected = [grid_sample_mean(images, g) for g in grids]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    grads = [torch.randn_like(a) for a in got]
    torch.testing.assert_close(torch.autograd.grad(got, images, grads)[0], torch.autograd.grad(expected, images, grads)[0],
                               atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match='other images'):
        BM.bilinear_mean(images.detach().clone(), grids[0], table_cache=cache)


def test_table_cache_of_half_precision_images():
    """Half-precision images are sampled from a float32 table; the cache is tied to the
    caller's images (not to their float32 copy, a new tensor each call), so a second call
    with the same images reuses the table."""
    images = torch.randn(1, 3, 4, 8, 8).half()
    grids = [make_grid(1, 3, 100, seed=s).float() for s in (7, 8)]
    cache = {}
    got = [BM.bilinear_mean(images, grids[0], table_cache=cache)]
    table = cache['table']
    got.append(BM.bilinear_mean(images, grids[1], table_cache=cache))
    assert cache['table'] is table and cache['images'] is images and table.dtype == torch.float32
    for a, g in zip(got, grids):
        torch.testing.assert_close(a, grid_sample_mean(images.float(), g))


def test_grid_gradient_and_few_points_use_grid_sample():
    images = torch.randn(1, 3, 2, 8, 8, dtype=torch.float64)
    grid = make_grid(1, 3, 100).requires_grad_(True)           # points that want a gradient
    got = BM.bilinear_mean(images, grid)
    assert got.grad_fn is not None and 'BilinearMeanCPU' not in type(got.grad_fn).__name__
    torch.testing.assert_close(got, grid_sample_mean(images, grid))
    assert torch.autograd.grad(got.sum(), grid)[0].abs().sum() > 0
    few = BM.bilinear_mean(images.requires_grad_(True), make_grid(1, 3, 10))   # fewer points than texels
    assert 'BilinearMeanCPU' not in type(few.grad_fn).__name__


def test_few_points_on_channels_innermost_images_use_the_table():
    """Fewer points than texels, but the channels innermost in memory (a channels-last
    convolution's planes): the table path, with grid_sample's values and gradients."""
    images = torch.randn(2, 3, 5, 8, 6, dtype=torch.float64)
    interleaved = images.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2).requires_grad_(True)
    grid = make_grid(2, 3, 10, seed=6)
    got = BM.bilinear_mean(interleaved, grid)
    assert 'BilinearMeanCPU' in type(got.grad_fn).__name__
    plain = images.clone().requires_grad_(True)
    expected = grid_sample_mean(plain, grid)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, interleaved, grad)[0], torch.autograd.grad(expected, plain, grad)[0],
                               atol=1e-12, rtol=0)


def test_half_precision_images_sample_in_float32():
    images = torch.randn(1, 1, 4, 8, 8).half()
    grid = make_grid(1, 1, 100).float()
    got = BM.bilinear_mean(images, grid)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, grid_sample_mean(images.float(), grid))


def test_bad_shapes():
    with pytest.raises(AssertionError):
        BM.bilinear_mean(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 2, 10, 2))


def test_texel_table_of_channels_last_images():
    """Images whose channels are innermost in memory (the output of channels-last
    convolutions, e.g. a tri-plane (B, 3, C, H, W) laid out (B, H, W, 3, C)) are copied into
    the table in one pass; the table equals the one built by transposing NCHW images, and
    sampling from it equals grid_sample."""
    images = torch.randn(2, 3, 5, 8, 6, dtype=torch.float64)
    interleaved = images.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)     # (B, H, W, P, C) in memory
    assert interleaved.stride(2) == 1 and torch.equal(interleaved, images)
    nans = torch.full([6 * (8 + 2 * BM.BORDER) * (6 + 2 * BM.BORDER) * 5], float('nan'), dtype=torch.float64)
    del nans                     # freed memory the table's may reuse: its border is written, not assumed zero
    table = BM._texel_table(interleaved)
    assert torch.equal(table, BM._texel_table(images.contiguous()))
    padded = torch.nn.functional.pad(images.reshape(6, 5, 8, 6), [BM.BORDER] * 4)
    assert torch.equal(table, padded.reshape(6, 5, -1).transpose(1, 2))
    grid = make_grid(2, 3, 90, seed=4)
    torch.testing.assert_close(BM.bilinear_mean(interleaved, grid), grid_sample_mean(images, grid), atol=1e-12, rtol=0)


def test_cpu_path_gradient_keeps_the_images_layout():
    # Planes viewed from a channels-last convolution's output: the gradient must come back in
    # that layout (a contiguous one reaches the convolution's backward in the other layout).
    conv_out = torch.randn(2, 3 * 5, 8, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    grid = make_grid(2, 3, 90, seed=5)
    assert grid.shape[2] >= 8 * 6                                 # the CPU table path
    grad, = torch.autograd.grad(BM.bilinear_mean(conv_out.view(2, 3, 5, 8, 6), grid).square().sum(), conv_out)
    assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()
    plain = conv_out.detach().contiguous().requires_grad_()
    ref, = torch.autograd.grad(grid_sample_mean(plain.view(2, 3, 5, 8, 6), grid).square().sum(), plain)
    torch.testing.assert_close(grad, ref, atol=1e-12, rtol=0)
