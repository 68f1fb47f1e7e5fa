"""Mean of bilinear samples of several images, each at its own points.

    bilinear_mean(images (B, P, C, H, W), grid (B, P, N, 2)) -> (B, N, C)
        = mean over p of grid_sample(images[:, p], grid[:, p, None]) (bilinear, zero padding,
          align_corners=False), points first.

What the tri-plane decoder reads (P = 3 planes at the projections of one point) and what
the texture rasterizer reads (P = 1 texture at the pixels' UVs). On the CPU, with at least
as many points as an image has texels and no gradient wanted for the grid, it runs as a
weighted sum of table rows (see _BilinearMeanCPU); elsewhere it is grid_sample.
"""

import numpy as np
import scipy.sparse
import torch

from torch_utils import misc


def bilinear_mean(images: torch.Tensor, grid: torch.Tensor, table_cache: dict = None) -> torch.Tensor:
    """Args:
        images: (B, P, C, H, W).
        grid:   (B, P, N, 2) grid_sample coordinates on image p: x (column) then y (row),
                -1 and 1 at the outer edges of the border texels.
        table_cache: a dict kept by a caller that samples the same images several times
                (the renderer's two passes): the CPU path builds its texel table once and
                keeps it there ({} to start; tied to `images`, the same tensor each call).
    Returns:
        (B, N, C), in float32 for half-precision images; points outside an image read zeros
        there. Gradients reach the images, and the grid on the grid_sample path.
    """
    misc.assert_shape(images, [None, None, None, None, None], 'images')
    batch_size, num_images, channels, height, width = images.shape
    misc.assert_shape(grid, [batch_size, num_images, None, 2], 'grid')
    num_points = grid.shape[2]
    # Half-precision grids cannot address a 256 texel image to better than ~0.1 texel: sample in float32 or wider.
    dtype = torch.promote_types(images.dtype, torch.float32)
    given = images                  # what table_cache is tied to (a half-precision one's copy is new each call)
    images, grid = images.to(dtype), grid.to(dtype)
    # The CPU path copies the images into a channels-last table: worth it from about as many
    # points as an image has texels, and for any number when the channels are innermost
    # already (a channels-last convolution's planes, which grid_sample's reshape below would
    # transpose: small128's density regularization, 8,000 points a plane at 128^2, forward
    # and backward 17 against 93 ms).
    channels_innermost = images.stride(2) == 1 and channels > 1
    if images.device.type == 'cpu' and not grid.requires_grad and (num_points >= height * width or channels_innermost):
        if table_cache is None:
            return _BilinearMeanCPU.apply(images, grid, None)
        if 'table' not in table_cache:
            table_cache.update(images=given, table=_texel_table(images))
        elif table_cache['images'] is not given:
            raise ValueError('bilinear_mean: table_cache holds the table of other images')
        return _BilinearMeanCPU.apply(images, grid, table_cache['table'])
    samples = torch.nn.functional.grid_sample(images.reshape(batch_size * num_images, channels, height, width),
                                              grid.reshape(batch_size * num_images, 1, num_points, 2),
                                              mode='bilinear', padding_mode='zeros', align_corners=False)
    return samples.reshape(batch_size, num_images, channels, num_points).mean(dim=1).transpose(1, 2)


class _BilinearMeanCPU(torch.autograd.Function):
    """bilinear_mean on the CPU. grid_sample's CPU forward writes every image's samples
    channels first (P times wider than their mean, in a layout the callers transpose), and
    its backward adds one float per channel plane. Here the forward is one weighted sum of
    the P x 4 texels around each point (F.embedding_bag over a channels-last copy of the
    images with a zero border, so that corners outside an image read zeros without masks),
    written points first. The backward scatters the same weights back into the table:
    `scatter_rows_sparse` up to SPARSE_MAX_THREADS torch threads, `scatter_rows_index_add`
    above (see them). The backward of small128's 98,304 points on 3 planes of 32 channels
    (benchmarks/plane_sampling.py): 7.9 ms against 24 ms on one thread, 7.4 against 16 ms
    on two. The limit of 4 extrapolates that (more threads were not measured).
    embedding_bag's own backward sorts its indices first and is slower still. Gradients
    reach the images only."""

    SPARSE_MAX_THREADS = 4      # scatter_rows_sparse (one thread) up to this many torch threads

    @staticmethod
    def forward(ctx, images: torch.Tensor, grid: torch.Tensor, table: torch.Tensor = None) -> torch.Tensor:
        batch_size, num_images, channels, height, width = images.shape
        num_points = grid.shape[2]
        pad = BORDER
        padded_h, padded_w = height + 2 * pad, width + 2 * pad
        if table is None:
            table = _texel_table(images)
        # int32 texel indices: half the index traffic of int64 in embedding_bag (the backward
        # widens them a chunk at a time: index_add_ is slower with int32).
        index_dtype = torch.int32 if table.numel() < 2 ** 31 else torch.int64
        corner = []
        weight = []
        for k, size in ((0, width), (1, height)):
            # Texel coordinate, points first (B, N, P), as grid_sample unnormalizes it
            # (align_corners=False: texel centres at integers).
            # Written points first: an add keeps the grid's P-first layout, which every tensor
            # made from t would inherit (the texel indices' reshape below would then copy them).
            t = torch.add(grid[..., k].transpose(1, 2), 1, out=grid.new_empty(batch_size, num_points, num_images))
            t.mul_(size).sub_(1).div_(2)
            t0 = t.floor()
            w1 = t.sub_(t0)                                        # weight of the upper corner
            weight.append((1 - w1, w1))
            corner.append(t0.clamp_(-pad, size).add_(pad).to(index_dtype))   # clamped into the zero border
        image = torch.arange(batch_size * num_images, dtype=index_dtype).reshape(batch_size, 1, num_images)
        base = (image * padded_h + corner[1]) * padded_w + corner[0]
        # Bags of 4 P texels per point: P images x 4 corners (y0 x0, y0 x1, y1 x0, y1 x1).
        texel = base.unsqueeze(-1) + torch.tensor([0, 1, padded_w, padded_w + 1], dtype=index_dtype)
        (wx0, wx1), (wy0, wy1) = weight
        if num_images > 1:
            wy0.mul_(1 / num_images), wy1.mul_(1 / num_images)       # the mean of the images
        weights = images.new_empty(batch_size, num_points, num_images, 4)
        for j, (wy, wx) in enumerate(((wy0, wx0), (wy0, wx1), (wy1, wx0), (wy1, wx1))):
            torch.mul(wy, wx, out=weights[..., j])
        texel, weights = texel.reshape(-1, 4 * num_images), weights.reshape(-1, 4 * num_images)
        out = torch.nn.functional.embedding_bag(texel, table.reshape(-1, channels), per_sample_weights=weights, mode='sum')
        ctx.save_for_backward(texel, weights)
        ctx.images_shape = images.shape
        # The images' gradient gets their memory layout (a channels-last convolution's output
        # viewed as planes stays channels last): a contiguous gradient would reach that
        # convolution's backward in the other layout, 2-3x slower there.
        ctx.images_stride = misc.dense_stride(images)
        return out.reshape(batch_size, num_points, channels)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        texel, weights = ctx.saved_tensors
        batch_size, num_images, channels, height, width = ctx.images_shape
        pad = BORDER
        grad = grad.reshape(-1, channels)
        num_texels = batch_size * num_images * (height + 2 * pad) * (width + 2 * pad)
        scatter = scatter_rows_sparse if torch.get_num_threads() <= _BilinearMeanCPU.SPARSE_MAX_THREADS else scatter_rows_index_add
        table = scatter(grad, texel, weights, num_texels)
        table = table.reshape(batch_size, num_images, height + 2 * pad, width + 2 * pad, channels)
        return misc.copy_with_stride(table[:, :, pad:-pad, pad:-pad].permute(0, 1, 4, 2, 3), ctx.images_stride), None, None


BORDER = 2      # zero texels around each image in the CPU path's table: far-away points are clamped onto them


def scatter_rows_sparse(rows: torch.Tensor, texel: torch.Tensor, weights: torch.Tensor, num_texels: int) -> torch.Tensor:
    """table[texel[n, j]] += weights[n, j] * rows[n] for every point n and bag entry j, as one
    SciPy product: the transposed sampling matrix, a CSC view of texel and weights (column n
    holds point n's bag; int32 indices are not copied), times the rows. One thread.

    rows (N, C), texel (N, K) int32 or int64, weights (N, K) in rows' dtype -> table
    (num_texels, C). SciPy adds each texel's terms column by column, i.e. point by point and
    in bag order, as scatter_rows_index_add does: on x86-64, where SciPy's product uses no
    fused multiply-add, the two agree to the bit (other CPUs: to rounding)."""
    pointer_dtype = np.int32 if texel.dtype == torch.int32 and texel.numel() < 2 ** 31 else np.int64
    pointers = np.arange(0, texel.numel() + 1, texel.shape[1], dtype=pointer_dtype)
    transposed = scipy.sparse.csc_matrix((weights.numpy().reshape(-1), texel.numpy().reshape(-1), pointers),
                                         shape=(num_texels, len(rows)), copy=False)
    return torch.from_numpy(np.asarray(transposed @ rows.contiguous().numpy()))


def scatter_rows_index_add(rows: torch.Tensor, texel: torch.Tensor, weights: torch.Tensor, num_texels: int,
                           chunk: int = 2048) -> torch.Tensor:
    """scatter_rows_sparse with torch's index_add_ (which uses torch's threads), `chunk` points
    at a time so that their weighted rows stay in the cache."""
    table = rows.new_zeros(num_texels, rows.shape[1])
    for i in range(0, len(rows), chunk):
        weighted = torch.mul(rows[i:i + chunk, None, :], weights[i:i + chunk, :, None])
        table.index_add_(0, texel[i:i + chunk].reshape(-1).to(torch.int64), weighted.reshape(-1, rows.shape[1]))
    return table


def _texel_table(images: torch.Tensor) -> torch.Tensor:
    """The CPU path's table: images (B, P, C, H, W) zero-bordered and channels last,
    (B P, (H + 2 BORDER) (W + 2 BORDER), C). Images already channels last in memory (what
    channels-last convolutions produce) are copied into the table's interior in one pass;
    others are transposed image by image, a 2-D transpose that PyTorch copies blockwise (a
    batched strided copy is twice as slow)."""
    batch_size, num_images, channels, height, width = images.shape
    images = images.detach()
    if images.stride(2) == 1:
        table = images.new_empty(batch_size, num_images, height + 2 * BORDER, width + 2 * BORDER, channels)
        table[:, :, BORDER:-BORDER, BORDER:-BORDER] = images.permute(0, 1, 3, 4, 2)
        for rows, columns in ((slice(0, BORDER), slice(None)), (slice(-BORDER, None), slice(None)),
                              (slice(BORDER, -BORDER), slice(0, BORDER)), (slice(BORDER, -BORDER), slice(-BORDER, None))):
            table[:, :, rows, columns] = 0                   # the border alone: the interior is written once
        return table.reshape(batch_size * num_images, -1, channels)
    bordered = torch.nn.functional.pad(images.reshape(batch_size * num_images, channels, height, width), [BORDER] * 4)
    bordered = bordered.reshape(batch_size * num_images, channels, -1)
    table = images.new_empty(batch_size * num_images, bordered.shape[2], channels)
    for i in range(batch_size * num_images):
        table[i].copy_(bordered[i].t())
    return table
