"""Generate images (three views per seed) and optionally shapes with a pretrained network.

    python gen_samples.py --outdir=out --trunc=0.7 --seeds=0-3 --shapes=true
    python gen_samples.py --outdir=out --seeds=166 --network=next3d_ffhq_512.pkl \
        --obj_path=demo.obj --lms_path=demo_kpt2d.txt --shapes=true --shape-format=.ply
"""

import math
import os

import click
import numpy as np
import torch
from tqdm import tqdm

import dnnlib
from training import coords, shapes
from training.generation import BUNDLED_NETWORK, check_mesh_options, frontal_label, load_generator, mesh_condition, orbit_label, save_image_grid


@click.command()
@click.option('--network', 'network_pkl', default=BUNDLED_NETWORK, show_default=True, help='Network snapshot or official pickle')
@click.option('--seeds', type=dnnlib.parse_range, default='0-3', show_default=True, help="Seeds, e.g. '0-3,7'")
@click.option('--trunc', 'truncation_psi', type=float, default=1.0, show_default=True, help='Truncation psi')
@click.option('--trunc-cutoff', 'truncation_cutoff', type=int, default=14, show_default=True, help='Truncation cutoff (number of ws)')
@click.option('--outdir', type=str, required=True, help='Where to save the output images')
@click.option('--shapes', type=bool, default=False, show_default=True, help='Also export the density volume of each seed')
@click.option('--shape-res', type=click.IntRange(min=16), default=512, show_default=True, help='Shape grid resolution per axis')
@click.option('--shape-format', type=click.Choice(['.mrc', '.ply']), default='.mrc', show_default=True, help='Density volume or marching-cubes surface')
@click.option('--fov-deg', type=float, default=coords.FOV_DEG, show_default=True, help="Field of view in degrees (EG3D's convention)")
@click.option('--obj_path', type=str, default=None, help='Driving mesh (.obj); default: the bundled head, neutral')
@click.option('--lms_path', type=str, default=None, help='68 x 3 landmarks of the mesh; default: the bundled head, neutral')
@click.option('--lms_cond', type=bool, default=True, show_default=True, help='Condition on the landmark file (else landmarks are computed from the mesh with the bundled head model)')
@click.option('--uv_mask_path', type=str, default=None, help='Face/eye UV mask PNG for official Next3D pickles that lack it')
@click.option('--device', type=str, default=None, help="torch device (default: cuda if available)")
def generate_images(network_pkl, seeds, truncation_psi, truncation_cutoff, outdir, shapes, shape_res, shape_format,
                    fov_deg, obj_path, lms_path, lms_cond, uv_mask_path, device):
    """Per seed: the views at yaw +0.4, 0, -0.4 (pitch -0.2) conditioned on a frontal camera -> seedNNNN.png."""
    ctx = click.get_current_context()
    for name in ('shape_res', 'shape_format'):
        if not shapes and ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f'--{name.replace("_", "-")} applies with --shapes=true only')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    G = load_generator(network_pkl, device, uv_mask_path)
    check_mesh_options(G, network_pkl, obj_path, lms_path, lms_cond)
    v = mesh_condition(G, obj_path, lms_path, lms_cond, device)
    focal = coords.fov_to_focal(fov_deg)
    c_cond = frontal_label(G, focal, device)
    os.makedirs(outdir, exist_ok=True)
    for seed in tqdm(seeds, desc='seeds', disable=len(seeds) < 2):
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).float().to(device)
        with torch.no_grad():
            ws = G.mapping(z, c_cond, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
            images = []
            for yaw in (0.4, 0.0, -0.4):
                c = orbit_label(G, math.pi / 2 + yaw, math.pi / 2 - 0.2, focal, device)
                images.append(G.synthesis(ws, c, v, noise_mode='const')['image'])
        save_image_grid(torch.cat(images), os.path.join(outdir, f'seed{seed:04d}.png'), grid=(3, 1))
        if shapes:
            export_shape(G, ws, v, shape_res, shape_format, os.path.join(outdir, f'seed{seed:04d}{shape_format}'), device)


def density_function(G, ws, v):
    """points (1, n, 3) world -> raw density (1, n, 1) of the tri-plane of ws (computed once)."""
    with torch.no_grad():
        planes = G.make_planes(ws, v, noise_mode='const')

    def sigma_fn(points):
        return G.renderer.run_model(planes, G.decoder, points, torch.zeros_like(points), G.rendering_kwargs)['sigma']
    return sigma_fn


def export_shape(G, ws, v, resolution: int, shape_format: str, path: str, device):
    """Density on a resolution^3 grid over the tri-plane box -> .mrc (EG3D layout) or .ply (level 10)."""
    box = G.rendering_kwargs['box_warp']
    sigma_fn = density_function(G, ws, v)
    with tqdm(total=resolution ** 3, desc=f'shape {os.path.basename(path)}', unit='pt', unit_scale=True, leave=False) as bar:
        volume = shapes.sample_density_volume(sigma_fn, resolution, box_warp=box, device=device, progress=bar)
    if shape_format == '.mrc':
        shapes.save_mrc(path, shapes.prepare_mrc_volume(volume))
    else:
        verts, faces = shapes.volume_to_mesh(volume, level=10.0, box_warp=box)
        shapes.save_ply(path, verts, faces)


if __name__ == '__main__':
    generate_images()
