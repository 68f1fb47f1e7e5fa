"""CPU speed of the renderer's plane sampling (the decoder's input), forward and backward.

The three planes' mean of bilinear samples at the points of one image's rays, as the
small128 renderer reads it in one pass (64 x 64 rays, 24 depths, planes of 32 x 128 x 128
in the layout a channels-last convolution leaves them), three ways:

    sparse:      ops.bilinear_mean's table path, its backward one SciPy sparse product
    index_add:   the same forward, its backward torch's index_add_ (the path above
                 SPARSE_MAX_THREADS threads)
    grid_sample: the reference, sample_from_planes(...).mean(1) (grid_sample and its backward)

Milliseconds per call (median) of the forward (the two table paths share theirs, timed
once), of the backward alone (after an untimed forward) and of both, for each thread count asked for. Reports whether the two table
backwards give the same gradient to the bit (on x86-64 they should) and how far they are
from grid_sample's. Writes the table to benchmarks/results/plane_sampling-cpu-<date>.md.
The table path needs at least as many points as a plane has texels (bilinear_mean takes
grid_sample's path below that): smaller sizes are refused.

    python benchmarks/plane_sampling.py                     # 1 and 2 threads
    python benchmarks/plane_sampling.py --threads 1,2,4 --repeats 9
"""

import contextlib
import datetime
import math
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, device_name, git_commit, load_average, timed, write_result   # noqa: E402
from torch_utils import host_memory                      # noqa: E402
from torch_utils.ops import bilinear_mean                # noqa: E402
from training import coords                              # noqa: E402
from training.volumetric_rendering import renderer      # noqa: E402
from training.volumetric_rendering.ray_sampler import RaySampler   # noqa: E402

PATHS = ('sparse', 'index_add', 'grid_sample')


def make_inputs(rays: int, depths: int, plane_res: int, channels: int):
    """Planes (1, 3, C, P, P) viewed from a channels-last (1, 3C, P, P) tensor, and the points
    (1, rays^2 depths, 3) of one camera's rays at evenly spaced depths in [2.25, 3.3]."""
    generator = torch.Generator().manual_seed(0)
    planes = torch.randn(1, 3 * channels, plane_res, plane_res, generator=generator)
    planes = planes.contiguous(memory_format=torch.channels_last).view(1, 3, channels, plane_res, plane_res)
    cam2world = coords.cam2world_look_at(torch.tensor([math.pi / 2 + 0.3]), torch.tensor([math.pi / 2 - 0.1]))
    origins, directions = RaySampler()(cam2world, coords.intrinsics()[None], rays)
    t = torch.linspace(2.25, 3.3, depths)
    points = origins[:, :, None, :] + directions[:, :, None, :] * t[None, None, :, None]
    return planes, points.reshape(1, -1, 3)


def sample(path: str, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The forward (the two table paths share it)."""
    if path == 'grid_sample':
        return renderer.sample_from_planes(planes, points).mean(dim=1)
    return renderer.sample_plane_mean(planes, points)


@contextlib.contextmanager
def backward_of(path: str):
    """Within: the table path's backward is `path`'s (sparse or index_add; grid_sample: unchanged)."""
    old = bilinear_mean._BilinearMeanCPU.SPARSE_MAX_THREADS
    bilinear_mean._BilinearMeanCPU.SPARSE_MAX_THREADS = {'sparse': 10 ** 6, 'index_add': 0}.get(path, old)
    try:
        yield
    finally:
        bilinear_mean._BilinearMeanCPU.SPARSE_MAX_THREADS = old


def gradient(path: str, planes: torch.Tensor, points: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Forward and backward: the planes' gradient for the output gradient `grad`."""
    planes = planes.detach().requires_grad_()
    with backward_of(path):
        sample(path, planes, points).backward(grad)
    return planes.grad


def backward_seconds(path: str, planes: torch.Tensor, points: torch.Tensor, grad: torch.Tensor, repeats: int) -> float:
    """Median seconds of the backward alone, each after an untimed forward (one more as a warm-up)."""
    seconds = []
    for _ in range(repeats + 1):
        leaf = planes.detach().requires_grad_()
        with backward_of(path):
            out = sample(path, leaf, points)
            start = time.perf_counter()
            out.backward(grad)
            seconds.append(time.perf_counter() - start)
    return sorted(seconds[1:])[repeats // 2]


@click.command()
@click.option('--rays', help='Rays per image side', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--depths', help='Samples per ray', type=click.IntRange(min=1), default=24, show_default=True)
@click.option('--plane-res', help='Plane resolution', type=click.IntRange(min=2), default=128, show_default=True)
@click.option('--channels', help='Channels per plane', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--threads', help='Comma-separated torch thread counts', default='1,2', show_default=True)
@click.option('--repeats', help='Timed calls per measurement (median)', type=click.IntRange(min=1), default=7, show_default=True)
@click.option('--outdir', help='Where to write the result', default=RESULTS_DIR, show_default='benchmarks/results')
def main(rays, depths, plane_res, channels, threads, repeats, outdir):
    """Time the plane sampling's forward and backward on the CPU, three ways."""
    try:
        thread_counts = [int(t) for t in threads.split(',')]
    except ValueError:
        raise click.BadParameter(f'{threads!r} is not a comma-separated list of integers', param_hint='--threads')
    if any(t < 1 for t in thread_counts):
        raise click.BadParameter('thread counts must be at least 1', param_hint='--threads')
    if rays * rays * depths < plane_res * plane_res:
        raise click.UsageError(f'{rays * rays * depths} points are fewer than a plane\'s {plane_res * plane_res} texels: '
                               'bilinear_mean samples them with grid_sample, not its table path')
    host_memory.keep_freed_memory()         # as train.py does
    device = torch.device('cpu')
    planes, points = make_inputs(rays, depths, plane_res, channels)
    grad = torch.randn(1, points.shape[1], channels, generator=torch.Generator().manual_seed(1))
    grads = {path: gradient(path, planes, points, grad) for path in PATHS}
    same_bits = torch.equal(grads['sparse'], grads['index_add'])
    between = float((grads['sparse'] - grads['index_add']).abs().max())
    reference_error = max(float((grads[p] - grads['grid_sample']).abs().max()) for p in ('sparse', 'index_add'))
    load_before = load_average()
    rows = []
    old_threads = torch.get_num_threads()
    try:
        for count in thread_counts:
            torch.set_num_threads(count)
            times = {}
            forwards = {}               # the two table paths share their forward: timed once
            for path in PATHS:
                kind = 'grid_sample' if path == 'grid_sample' else 'table'
                if kind not in forwards:
                    with torch.no_grad():
                        forwards[kind] = timed(lambda: sample(path, planes, points), device, repeats)
                forward = forwards[kind]
                backward = backward_seconds(path, planes, points, grad, repeats)
                both = timed(lambda: gradient(path, planes, points, grad), device, repeats)
                times[path] = (forward, backward, both)
            for path in PATHS:
                forward, backward, both = times[path]
                rows.append(f'| {count} | {path} | {forward * 1e3:.1f} | {backward * 1e3:.1f} | {both * 1e3:.1f} | '
                            f'{times["grid_sample"][2] / both:.2f}x |')
    finally:
        torch.set_num_threads(old_threads)
    now = datetime.datetime.now(datetime.timezone.utc)
    command = ' '.join(['python benchmarks/plane_sampling.py'] + sys.argv[1:])
    lines = [
        '# Plane sampling on the CPU: the table path\'s two backwards and grid_sample',
        '',
        f'- command: `{command}`',
        f'- date: {now:%Y-%m-%d %H:%M} UTC; git commit: {git_commit()}; torch {torch.__version__}',
        f'- machine: {device_name(device).rsplit(" (", 1)[0]}; system load average (1 min) before / after: '
        f'{load_before:.1f} / {load_average():.1f}',
        f'- one image: {rays} x {rays} rays x {depths} depths = {points.shape[1]:,} points; planes 3 x {channels} x '
        f'{plane_res}^2 (channels-last view); median of {repeats} calls each; the backward timed alone, after an untimed forward',
        f'- gradients: sparse and index_add {"equal to the bit" if same_bits else f"differ by up to {between:.1e}"}; '
        f'largest difference to grid_sample\'s {reference_error:.1e}',
        '',
        '| threads | path | forward ms | backward ms | forward + backward ms | forward + backward vs grid_sample |',
        '|---|---|---|---|---|---|',
    ] + rows + ['']
    text = '\n'.join(lines)
    print(text)
    write_result(outdir, f'plane_sampling-cpu-{now:%Y-%m-%d-%H%M}.md', text)


if __name__ == '__main__':
    main()
