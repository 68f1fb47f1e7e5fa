"""Throughput of the tri-plane renderer and of the mouth crop/paste.

Times ImportanceRenderer (stratified + importance passes, OSGDecoder at its FFHQ size) on
random planes seen by a frontal FFHQ camera, forward only and forward + backward, and
crop_mouth / paste_mouth on a 32-channel front render. Prints one line per measurement
and optionally writes them as JSON.

    python benchmarks/render.py                             # CPU, tiny sizes
    python benchmarks/render.py --device cuda --resolution 64 --plane-res 256 --batch 4
"""

import json
import math
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import device_name, timed                       # noqa: E402
from torch_utils import persistence                                   # noqa: E402
from training import coords                                            # noqa: E402
from training.mouth import crop_mouth, paste_mouth                     # noqa: E402
from training.triplane_decoder import OSGDecoder                       # noqa: E402
from training.volumetric_rendering.ray_sampler import RaySampler       # noqa: E402
from training.volumetric_rendering.renderer import ImportanceRenderer  # noqa: E402


@click.command()
@click.option('--device', default='cpu', show_default=True, help='torch device')
@click.option('--batch', default=1, show_default=True, type=click.IntRange(min=1), help='images per call')
@click.option('--resolution', default=32, show_default=True, type=click.IntRange(min=1), help='neural rendering resolution (rays per side)')
@click.option('--plane-res', default=64, show_default=True, type=click.IntRange(min=1), help='tri-plane resolution')
@click.option('--samples', default=48, show_default=True, type=click.IntRange(min=2), help='stratified samples per ray')
@click.option('--importance', default=48, show_default=True, type=click.IntRange(min=0), help='importance samples per ray')
@click.option('--front-res', default=128, show_default=True, type=click.IntRange(min=8), help='front render side for crop/paste')
@click.option('--repeats', default=5, show_default=True, type=click.IntRange(min=1), help='timed repetitions (median reported)')
@click.option('--threads', default=None, type=click.IntRange(min=1), help='torch CPU threads (default: torch\'s choice)')
@click.option('--out', 'out_path', default=None, type=click.Path(dir_okay=False), help='write the results as JSON here')
def main(device, batch, resolution, plane_res, samples, importance, front_res, repeats, threads, out_path):
    """Time the renderer and the mouth crop/paste."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(0)

    decoder = OSGDecoder().to(device)
    renderer = ImportanceRenderer().to(device)
    planes = (torch.randn(batch, 3, 32, plane_res, plane_res, device=device) * 0.5).requires_grad_()
    cam2world = coords.cam2world_look_at(torch.full([batch], math.pi / 2), torch.full([batch], math.pi / 2)).to(device)
    intrinsics = coords.intrinsics().expand(batch, 3, 3).to(device)
    ray_origins, ray_directions = RaySampler()(cam2world, intrinsics, resolution)
    options = dict(ray_start=coords.RAY_START, ray_end=coords.RAY_END, box_warp=coords.BOX_WARP,
                   depth_resolution=samples, depth_resolution_importance=importance)

    def render():
        return renderer(planes, decoder, ray_origins, ray_directions, options)

    def render_backward():
        rgb, depth, _ = render()
        (rgb.square().mean() + depth.mean()).backward()

    front = torch.randn(batch, 32, front_res, front_res, device=device, requires_grad=True)
    side = int(front_res * 0.3) // 2 * 2                                  # whole-pixel box (x0, y0, side)
    box = torch.tensor([[front_res // 2 - side // 2, int(front_res * 0.7) - side // 2, side]], device=device).repeat(batch, 1)
    box[:, 2] += 2 * torch.arange(batch, device=device)                   # a different box size per sample
    patch = torch.randn(batch, 32, 64, 64, device=device)

    rays = batch * resolution * resolution
    points = rays * (samples + importance)
    results = dict(device=device_name(device),
                   threads=torch.get_num_threads(), torch=torch.__version__, batch=batch, resolution=resolution,
                   plane_res=plane_res, samples=samples, importance=importance, front_res=front_res, repeats=repeats)
    with torch.no_grad():
        t = timed(render, device, repeats)
    results['render_forward_s'] = t
    results['render_forward_rays_per_s'] = rays / t
    results['render_forward_points_per_s'] = points / t
    t = timed(render_backward, device, repeats)
    results['render_forward_backward_s'] = t
    results['render_forward_backward_rays_per_s'] = rays / t
    with torch.no_grad():
        results['crop_mouth_s'] = timed(lambda: crop_mouth(front, box, 64), device, repeats)
        results['paste_mouth_s'] = timed(lambda: paste_mouth(front, patch, box), device, repeats)

    for key, value in results.items():
        click.echo(f'{key:40s} {value:.4g}' if isinstance(value, float) else f'{key:40s} {value}')
    if out_path is not None:
        persistence.atomic_write_bytes(out_path, (json.dumps(results, indent=2) + '\n').encode())


if __name__ == '__main__':
    main()
