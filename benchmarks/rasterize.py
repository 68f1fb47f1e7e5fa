"""Throughput of the rasterizer and of the texture-to-tri-plane rasterization.

Rasterizes the bundled head model (random identities, jaw open) from the four
orthographic views of the texture rasterization, and runs TexturePlaneRasterizer on a
32-channel 256x256 neural texture. Reports the median wall time and, on CPU, the median
process CPU time (less sensitive to other load on a shared machine), with the load average.

    python benchmarks/rasterize.py                              # CPU, 4 heads x 4 views at 256
    python benchmarks/rasterize.py --device cuda --batch 8
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import load_average, timed                                 # noqa: E402
from training.mesh.head_model import default_head_model_dir, load_head_model   # noqa: E402
from training.mesh.rasterize import rasterize                                    # noqa: E402
from training.mesh.texture_planes import TexturePlaneRasterizer                  # noqa: E402


@click.command()
@click.option('--device', default='cpu', show_default=True, help='torch device: cpu, cuda or cuda:N')
@click.option('--batch', type=int, default=4, show_default=True, help='Heads per batch (x 4 views)')
@click.option('--resolution', type=int, default=256, show_default=True, help='Tri-plane render width and height in pixels')
@click.option('--channels', type=int, default=32, show_default=True, help='Neural texture channels')
@click.option('--repeats', type=int, default=5, show_default=True, help='Timed repetitions (median reported)')
@click.option('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
def main(device, batch, resolution, channels, repeats, threads):
    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    flame = load_head_model()
    jaw = torch.zeros(batch, 3)
    jaw[:, 0] = 0.2
    verts, _ = flame(shape=torch.randn(batch, flame.n_shape, generator=g), jaw_pose=jaw)
    d = default_head_model_dir()
    mod = TexturePlaneRasterizer.from_template(os.path.join(d, 'head_template.obj'), os.path.join(d, 'uv_face_eye_mask.png'),
                                               image_size=resolution).to(device)
    verts = verts.to(device)
    ndc = mod.to_view_ndc(verts).reshape(4 * batch, -1, 3)
    texture = torch.randn(batch, channels, 256, 256, generator=g).to(device)
    load = load_average()
    print(f'device {device}, torch threads {torch.get_num_threads()}, load average {load:.2f}, '
          f'{verts.shape[1]} vertices, {len(mod.faces)} faces')
    wall, cpu = timed(lambda: rasterize(ndc, mod.faces, resolution), device, repeats, cpu_time=True)
    print(f'rasterize {batch} heads x 4 views at {resolution}: wall {wall * 1000:.0f} ms, CPU {cpu * 1000:.0f} ms')
    wall, cpu = timed(lambda: mod(verts, texture), device, repeats, cpu_time=True)
    print(f'TexturePlaneRasterizer forward ({channels} ch): wall {wall * 1000:.0f} ms, CPU {cpu * 1000:.0f} ms')


if __name__ == '__main__':
    main()
