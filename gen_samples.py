"""Generate images (three views per seed) and optionally shapes with a pretrained network.

    python gen_samples.py --outdir=out --trunc=0.7 --seeds=0-3 --shapes=true
    python gen_samples.py --outdir=out --seeds=166 --network=next3d_ffhq_512.pkl \
        --obj_path=demo.obj --lms_path=demo_kpt2d.txt --shapes=true --shape-format=.ply
    python gen_samples.py --outdir=out --network=out/me/avatar.pkl     # invert.py's avatar: out/projected.png
"""

import math
import os
import time

import click
import numpy as np
import torch
from tqdm import tqdm

from dnnlib import cli
from torch_utils import host_memory
from training import coords, shapes
from training.generation import (BUNDLED_NETWORK, SEED_OPTIONS, avatar_latents, check_mesh_options, frontal_label, load_network,
                                 mesh_condition, options_given, orbit_label, read_mesh_condition, save_image_grid)

PREVIEW_RES = 64    # samples per axis of the preview: one chunk of sample_density_volume
FRONT_RES = 32      # rays per side of the frontal view that the automatic level looks through (its central half)


@click.command()
@click.option('--network', 'network_pkl', default=BUNDLED_NETWORK, show_default=True, help='Network pickle (path): our network-snapshot-*.pkl or an official EG3D/Next3D pickle')
@click.option('--seeds', type=cli.Seeds(), default='0-3', show_default=True, help='Latent seeds: integers and ranges, comma-separated, e.g. 0-3,7')
@click.option('--projected-w', 'projected_w', type=click.Path(exists=True, dir_okay=False), default=None,
              help="An inverted avatar's latent (projected_w.npz of invert.py) instead of seeds -> projected.png; "
                   "default: the projected_w an avatar snapshot holds")
@click.option('--trunc', 'truncation_psi', type=cli.FiniteFloat(), default=1.0, show_default=True, help='Truncation psi: 1 = none, 0 = the average w (the EG3D examples use 0.7)')
@click.option('--trunc-cutoff', 'truncation_cutoff', type=int, default=14, show_default=True, help="Truncate only the first N ws: 14 = the backbone's at full size (Next3D's texture ws after them stay untruncated)")
@click.option('--outdir', type=click.Path(file_okay=False), required=True, help='Output folder (created if missing): seedNNNN.png and the shapes')
@click.option('--shapes', type=bool, default=False, show_default=True, help='Also export the density of each seed as seedNNNN<shape-format> (true/false)')
@click.option('--shape-res', type=click.IntRange(min=16), default=512, show_default=True,
              help='Density grid samples per axis over the tri-plane box; the time grows with its cube (an estimate is printed)')
@click.option('--shape-format', type=click.Choice(shapes.SHAPE_FORMATS), default='.mrc', show_default=True,
              help='.mrc: the raw density volume (float32, EG3D layout); .ply / .obj: a closed marching-cubes surface '
                   "(a Gaussian generator's .ply: its Gaussians' centres, a coloured point cloud)")
@click.option('--shape-level', type=str, default='auto', show_default=True, metavar='FLOAT|auto',
              help='Raw density (sigma) of the .ply/.obj surface: a number, or auto = min(10, half the maximum, the level '
                   "90% of the frontal view's central rays reach): EG3D's 10 for a model whose face is that dense")
@click.option('--fov-deg', type=cli.FiniteFloat(min=0, max=180, min_open=True, max_open=True), default=coords.FOV_DEG, show_default=True, help="Field of view in degrees (EG3D's convention; the default is its focal length 4.2647)")
@click.option('--obj_path', type=click.Path(exists=True, dir_okay=False), default=None, help='Driving mesh (.obj); default: the bundled head, neutral')
@click.option('--lms_path', type=click.Path(exists=True, dir_okay=False), default=None, help="68 landmarks of the mesh, one 'x y z' line each (mesh space, metres); default: the bundled head's")
@click.option('--lms_cond', type=bool, default=True, show_default=True, help='Condition on the landmark file (else landmarks are computed from the mesh with the bundled head model)')
@click.option('--uv_mask_path', type=click.Path(exists=True, dir_okay=False), default=None, help='Face/eye UV mask PNG for official Next3D pickles that lack it')
@click.option('--device', type=str, default=None, help='torch device: cpu, cuda or cuda:N (default: cuda if available, else cpu)')
@cli.user_errors
def generate_images(network_pkl, seeds, projected_w, truncation_psi, truncation_cutoff, outdir, shapes, shape_res, shape_format,
                    shape_level, fov_deg, obj_path, lms_path, lms_cond, uv_mask_path, device):
    """Per seed: the views at yaw +0.4, 0, -0.4 (pitch -0.2) conditioned on a frontal camera -> seedNNNN.png
    (an inverted avatar: projected.png)."""
    host_memory.keep_freed_memory()      # CPU: freed tensors stay in the heap for the next ones
    ctx = click.get_current_context()
    for name in ('shape_res', 'shape_format', 'shape_level'):
        if not shapes and ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f'--{name.replace("_", "-")} applies with --shapes=true only')
    if shapes:
        shape_level = check_shape_options(shape_format, shape_level)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    condition = read_mesh_condition(obj_path, lms_path, lms_cond)
    data = load_network(network_pkl, device, uv_mask_path)
    G = data.G_ema
    check_mesh_options(G, network_pkl, obj_path, lms_path, lms_cond)
    v = mesh_condition(G, condition, obj_path, device)
    focal = coords.fov_to_focal(fov_deg)
    c_cond = frontal_label(G, focal, device)
    c_front = frontal_label(G, coords.FOCAL_LENGTH, device)       # the automatic shape level's view, whatever --fov-deg
    avatar = avatar_latents(G, data, network_pkl, projected_w, options_given(ctx, SEED_OPTIONS))
    if avatar is None:      # (output name, seed, ws): seeds, or the ws of an inverted avatar
        jobs = [(f'seed{seed:04d}', seed, None) for seed in seeds]
    else:
        jobs = [('projected' if len(avatar) == 1 else f'projected{k:02d}', 0, w[None]) for k, w in enumerate(avatar)]
    os.makedirs(outdir, exist_ok=True)
    for name, seed, ws in tqdm(jobs, desc='seeds', disable=len(jobs) < 2):
        generator = torch.Generator(device).manual_seed(seed)        # the renderer's depth sampling: same seed, same pixels
        with torch.no_grad():
            if ws is None:
                z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).float().to(device)
                ws = G.mapping(z, c_cond, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
            images = []
            for yaw in (0.4, 0.0, -0.4):
                c = orbit_label(G, math.pi / 2 + yaw, math.pi / 2 - 0.2, focal, device)
                images.append(G.synthesis(ws, c, v, noise_mode='const', generator=generator)['image'])
        save_image_grid(torch.cat(images), os.path.join(outdir, f'{name}.png'), grid=(3, 1))
        if shapes:
            export_shape(G, ws, v, shape_res, shape_level, os.path.join(outdir, f'{name}{shape_format}'), device, c_front)


def density_function(G, ws, v):
    """points (1, n, 3) world -> raw density (1, n, 1) of the tri-plane of ws (computed once), or
    of a Gaussian generator's Gaussians (their own density_function)."""
    if hasattr(G, 'density_function'):
        return G.density_function(ws, v)
    with torch.no_grad():
        planes = G.make_planes(ws, v, noise_mode='const')

    def sigma_fn(points):
        return G.renderer.run_model(planes, G.decoder, points, torch.zeros_like(points), G.rendering_kwargs)['sigma']
    return sigma_fn


def check_shape_options(shape_format: str, shape_level: str):
    """Before any work: the format's packages are installed and --shape-level is valid -> level (None: auto)."""
    try:
        shapes.check_dependencies(shape_format)
    except ImportError as e:
        raise click.ClickException(str(e))
    if shape_level == 'auto':
        return None
    if shape_format == '.mrc':
        raise click.UsageError('--shape-level applies to .ply/.obj surfaces (a .mrc keeps the whole volume; a level is printed for viewing)')
    try:
        level = float(shape_level)
    except ValueError:
        level = math.nan
    if not math.isfinite(level):
        raise click.BadParameter(f'{shape_level!r}: expected a finite number or auto', param_hint='--shape-level')
    return level


def frontal_central_rays(G, c: torch.Tensor, resolution: int = FRONT_RES):
    """Rays of the central half (in rows and columns) of a resolution^2 view from camera label c [1, 25]
    -> origins, directions [1, (resolution / 2)^2, 3]."""
    a, b = resolution // 4, resolution - resolution // 4
    return tuple(rays.reshape(len(c), resolution, resolution, 3)[:, a:b, a:b].reshape(len(c), -1, 3)
                 for rays in G.ray_sampler(*coords.split_label(c), resolution))


def export_shape(G, ws, v, resolution: int, level, path: str, device, c: torch.Tensor = None):
    """Density on a resolution^3 grid over the tri-plane box -> .mrc (EG3D layout) or a .ply/.obj surface.

    A grid of PREVIEW_RES^3 runs first: it times the device (the estimate is printed) and, for
    surfaces, fixes the level (None: automatic), so a level the density never reaches fails
    before the full grid is computed. The automatic level looks through the frontal camera
    label `c` (shapes.surface_level; without c or a ray sampler, it is min(10, half the maximum)).
    """
    name = os.path.basename(path)
    if path.endswith('.ply') and hasattr(G, 'point_cloud'):       # a Gaussian generator: its centres
        if level is not None:
            raise click.UsageError('--shape-level does not apply to a Gaussian generator\'s .ply (the Gaussians\' centres)')
        cloud = G.point_cloud(ws, v)
        shapes.save_point_cloud(path, cloud['points'].cpu().numpy(), cloud['rgb'].cpu().numpy())
        tqdm.write(f'{name}: {len(cloud["points"]):,} Gaussian centres (a coloured point cloud)')
        return
    box = G.rendering_kwargs['box_warp']
    sigma_fn = density_function(G, ws, v)
    preview_res = min(resolution, PREVIEW_RES)
    start = time.perf_counter()
    volume = shapes.sample_density_volume(sigma_fn, preview_res, box_warp=box, device=device)
    seconds = time.perf_counter() - start
    reach = None
    if level is None and c is not None and hasattr(G, 'ray_sampler'):
        reach = shapes.front_reach(sigma_fn, *frontal_central_rays(G, c), box_warp=box)
    is_mesh = not path.endswith('.mrc')
    if is_mesh:
        try:
            level_used = shapes.surface_level(float(volume.max()), level, reach)
        except ValueError as e:
            hint = '; --shape-level=auto picks a level below the maximum' if level is not None else ''
            raise click.ClickException(f'{path}: {e} on a {preview_res}^3 grid: no surface{hint}')
        tqdm.write(f'{name}: {describe_level(level_used, float(volume.max()), level, reach)} on a {preview_res}^3 grid')
    if resolution > preview_res:
        estimate = seconds * (resolution / preview_res) ** 3
        duration = f'{estimate:.0f} s' if estimate < 120 else f'{estimate / 60:.0f} min'
        tqdm.write(f'{name}: {resolution}^3 = {resolution ** 3:,} density samples, '
                   f'about {duration} (timed on the {preview_res}^3 grid)')
        with tqdm(total=resolution ** 3, desc=name, unit='pt', unit_scale=True, leave=False) as bar:
            volume = shapes.sample_density_volume(sigma_fn, resolution, box_warp=box, device=device, progress=bar)
    if not is_mesh:
        shapes.save_mrc(path, shapes.prepare_mrc_volume(volume))
        try:
            view = 'view it at ' + describe_level(shapes.surface_level(float(volume.max()), None, reach), float(volume.max()), None, reach)
        except ValueError as e:
            view = f'{e}: no surface'
        tqdm.write(f'{name}: density {volume.min():.4g} .. {volume.max():.4g}; {view}')
        return
    try:
        verts, faces = shapes.volume_to_mesh(volume, level=level_used, box_warp=box)
    except ValueError as e:     # the full grid can miss a level that the preview just reached
        raise click.ClickException(f'{path}: {e}')
    shapes.save_mesh(path, verts, faces)
    tqdm.write(f'{name}: {len(verts):,} vertices, {len(faces):,} faces')


def describe_level(level: float, density_max: float, requested, reach: float = None) -> str:
    """'level 3.961 (auto: ...)': says where the level comes from."""
    if requested is not None:
        return f'level {level:g} (density maximum {density_max:.4g})'
    if level == shapes.EG3D_LEVEL:
        return f"level {level:g} (auto: EG3D's; density maximum {density_max:.4g})"
    if reach is not None and level == reach:
        return (f'level {level:.4g} (auto: reached by {shapes.FRONT_COVER:.0%} of the frontal view\'s central rays, '
                f'below EG3D\'s 10; density maximum {density_max:.4g})')
    return f"level {level:.4g} (auto: half the density maximum {density_max:.4g}; EG3D's 10 from a maximum of 20)"


if __name__ == '__main__':
    generate_images()
