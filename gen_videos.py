"""Render orbit videos with latent interpolation between seeds.

    python gen_videos.py --outdir=out --trunc=0.7 --seeds=0-3 --grid=2x2
    python gen_videos.py --outdir=out --seeds=0-1 --grid=1x1 --image_mode=image_depth --interpolate=false
    python gen_videos.py --outdir=out --network=out/me/avatar.pkl     # orbit invert.py's avatar: out/projected.mp4
"""

import math
import os

import click
import numpy as np
import scipy.interpolate
import torch
from tqdm import tqdm

import dnnlib
from dnnlib import cli
from torch_utils import host_memory
from training.generation import (BUNDLED_NETWORK, SEED_OPTIONS, avatar_latents, check_mesh_options, depth_to_image, frontal_label, load_network,
                                 make_grid, mesh_condition, options_given, orbit_label, read_mesh_condition, to_uint8)
from training.video import VideoWriter


def orbit_angles(t: float, yaw_range: float = 0.35, pitch_range: float = 0.25):
    """Camera angles at phase t in [0, 1): yaw = pi/2 + 0.35 sin(2 pi t), pitch = pi/2 - 0.05 + 0.25 cos(2 pi t)."""
    return (math.pi / 2 + yaw_range * math.sin(2 * math.pi * t),
            math.pi / 2 - 0.05 + pitch_range * math.cos(2 * math.pi * t))


def interpolate_ws(ws: np.ndarray, num_keyframes: int, wraps: int = 2):
    """Cyclic cubic interpolation of keyframe latents: ws (K, ...) -> f(t), t in keyframe units."""
    if num_keyframes == 1:
        return lambda t: ws[0]
    x = np.arange(-num_keyframes * wraps, num_keyframes * (wraps + 1))
    y = np.tile(ws, [wraps * 2 + 1] + [1] * (ws.ndim - 1))
    return scipy.interpolate.interp1d(x, y, kind='cubic', axis=0)


def render_video(G, path, seeds, grid, num_keyframes, w_frames, psi, truncation_cutoff, image_mode, v, device,
                 sample_mult=1.0, nrr=None, fps=60, ws=None):
    """ws: keyframe latents (K, num_ws, w_dim) of a 1x1 grid (an inverted avatar) instead of the seeds'."""
    gw, gh = grid
    if ws is not None:
        num_keyframes = len(ws)
    else:
        if num_keyframes is None:
            if len(seeds) % (gw * gh) != 0:
                raise click.BadParameter(f'{len(seeds)} seeds do not divide into a {gw}x{gh} grid', param_hint='--seeds')
            num_keyframes = len(seeds) // (gw * gh)
        all_seeds = [seeds[i % len(seeds)] for i in range(num_keyframes * gw * gh)]
        c = frontal_label(G, device=device)
        zs = torch.from_numpy(np.stack([np.random.RandomState(s).randn(G.z_dim) for s in all_seeds])).float().to(device)
        with torch.no_grad():
            ws = G.mapping(zs, c.expand(len(zs), -1), truncation_psi=psi, truncation_cutoff=truncation_cutoff)
    ws = ws.reshape(gh, gw, num_keyframes, *ws.shape[1:]).cpu().numpy()
    interps = [[interpolate_ws(ws[y, x], num_keyframes) for x in range(gw)] for y in range(gh)]

    rendering_kwargs = dict(G.rendering_kwargs)
    G.rendering_kwargs['depth_resolution'] = int(rendering_kwargs['depth_resolution'] * sample_mult)
    G.rendering_kwargs['depth_resolution_importance'] = int(rendering_kwargs['depth_resolution_importance'] * sample_mult)
    num_frames = num_keyframes * w_frames
    generator = torch.Generator(device).manual_seed(seeds[0])    # the renderer's depth sampling: same seeds, same frames
    try:
        with VideoWriter(path, fps=fps) as video:
            for frame_idx in tqdm(range(num_frames), desc=os.path.basename(path)):
                yaw, pitch = orbit_angles(frame_idx / num_frames)
                cam = orbit_label(G, yaw, pitch, device=device)
                w = np.stack([interps[y][x](frame_idx / w_frames) for y in range(gh) for x in range(gw)])
                w = torch.from_numpy(w).float().to(device)                          # every tile in one batch
                with torch.no_grad():
                    out = G.synthesis(w, cam.expand(len(w), -1), None if v is None else v.expand(len(w), -1, -1),
                                      neural_rendering_resolution=nrr, noise_mode='const', generator=generator)
                tiles = depth_to_image(out['image_depth']) if image_mode == 'image_depth' else out[image_mode]
                video.append(make_grid(to_uint8(tiles), (gw, gh)))
    finally:
        G.rendering_kwargs.clear()
        G.rendering_kwargs.update(rendering_kwargs)
    return num_frames


@click.command()
@click.option('--network', 'network_pkl', default=BUNDLED_NETWORK, show_default=True, help='Network pickle (path): our network-snapshot-*.pkl or an official EG3D/Next3D pickle')
@click.option('--seeds', type=cli.Seeds(), default='0-3', show_default=True, help='Latent seeds: integers and ranges, comma-separated, e.g. 0-3,7')
@click.option('--projected-w', 'projected_w', type=click.Path(exists=True, dir_okay=False), default=None,
              help="Orbit an inverted avatar's latent (projected_w.npz of invert.py) instead of seeds -> projected.mp4; "
                   "default: the projected_w an avatar snapshot holds")
@click.option('--shuffle-seed', type=click.IntRange(0, 2 ** 32 - 1), default=None, help='Shuffle the seeds with this random seed (default: keep their order)')
@click.option('--grid', type=dnnlib.parse_vec2, default='1x1', show_default=True, metavar='WxH', help='Seeds tiled W x H per video frame, e.g. 2x2 (with --interpolate=true)')
@click.option('--num-keyframes', type=click.IntRange(min=1), default=None, help='Keyframes of the interpolation (default: number of seeds / grid cells)')
@click.option('--w-frames', type=click.IntRange(min=1), default=120, show_default=True, help='Frames from one keyframe to the next (at --fps per second)')
@click.option('--trunc', 'truncation_psi', type=cli.FiniteFloat(), default=1.0, show_default=True, help='Truncation psi: 1 = none, 0 = the average w (the EG3D examples use 0.7)')
@click.option('--trunc-cutoff', 'truncation_cutoff', type=int, default=14, show_default=True, help="Truncate only the first N ws: 14 = the backbone's at full size (Next3D's texture ws after them stay untruncated)")
@click.option('--outdir', type=click.Path(file_okay=False), required=True, help='Output folder (created if missing)')
@click.option('--image_mode', type=click.Choice(['image', 'image_depth', 'image_raw']), default='image', show_default=True,
              help='image: the final RGB; image_depth: the depth of the raw rendering, near = bright, scaled per frame; '
                   'image_raw: the low-resolution neural rendering (its first 3 channels)')
@click.option('--sample_mult', type=cli.FiniteFloat(min=0, min_open=True), default=1.0, show_default=True, help='Multiplier (> 0) of the samples per ray (stratified and importance): more is sharper and slower')
@click.option('--nrr', type=int, default=None, help="Neural rendering resolution in pixels (default: the network's)")
@click.option('--interpolate', type=bool, default=True, show_default=True, help='One interpolation video of the grid; false: one 1x1 video per seed')
@click.option('--obj_path', type=click.Path(exists=True, dir_okay=False), default=None, help='Driving mesh (.obj); default: the bundled head, neutral')
@click.option('--lms_path', type=click.Path(exists=True, dir_okay=False), default=None, help="68 landmarks of the mesh, one 'x y z' line each (mesh space, metres); default: the bundled head's")
@click.option('--lms_cond', type=bool, default=True, show_default=True, help='Condition on the landmark file (else computed from the mesh)')
@click.option('--fps', type=click.IntRange(min=1), default=60, show_default=True, help='Frames per second of the mp4 (integer)')
@click.option('--uv_mask_path', type=click.Path(exists=True, dir_okay=False), default=None, help='Face/eye UV mask PNG for official Next3D pickles that lack it')
@click.option('--device', type=str, default=None, help='torch device: cpu, cuda or cuda:N (default: cuda if available, else cpu)')
@cli.user_errors
def generate_videos(network_pkl, seeds, projected_w, shuffle_seed, grid, num_keyframes, w_frames, truncation_psi, truncation_cutoff,
                    outdir, image_mode, sample_mult, nrr, interpolate, obj_path, lms_path, lms_cond, fps, uv_mask_path, device):
    """Orbit videos: mp4, libx264, 10 Mbit/s."""
    host_memory.keep_freed_memory()      # CPU: freed tensors stay in the heap for the next ones
    ctx = click.get_current_context()
    for name in ('grid', 'num_keyframes'):
        if not interpolate and ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f'--{name.replace("_", "-")} applies with --interpolate=true only (false: one 1x1 video per seed)')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    condition = read_mesh_condition(obj_path, lms_path, lms_cond)
    data = load_network(network_pkl, device, uv_mask_path)
    G = data.G_ema
    check_mesh_options(G, network_pkl, obj_path, lms_path, lms_cond)
    v = mesh_condition(G, condition, obj_path, device)
    seed_options = {**SEED_OPTIONS, 'shuffle_seed': '--shuffle-seed', 'grid': '--grid', 'num_keyframes': '--num-keyframes',
                    'interpolate': '--interpolate'}
    ws = avatar_latents(G, data, network_pkl, projected_w, options_given(ctx, seed_options))
    if ws is not None:      # an inverted avatar: one orbit video (several ws of an .npz are its keyframes)
        os.makedirs(outdir, exist_ok=True)
        path = os.path.join(outdir, 'projected.mp4' if image_mode == 'image' else f'projected_{image_mode}.mp4')
        render_video(G, path, [0], (1, 1), None, w_frames, 1, None, image_mode, v, device, sample_mult, nrr, fps, ws=ws)
        return
    if shuffle_seed is not None:
        np.random.RandomState(shuffle_seed).shuffle(seeds)
    os.makedirs(outdir, exist_ok=True)
    if interpolate:
        path = os.path.join(outdir, 'interpolation.mp4' if image_mode == 'image' else f'interpolation_{image_mode}.mp4')
        render_video(G, path, seeds, grid, num_keyframes, w_frames, truncation_psi, truncation_cutoff, image_mode, v, device, sample_mult, nrr, fps)
    else:
        for seed in seeds:
            path = os.path.join(outdir, f'{seed}.mp4' if image_mode == 'image' else f'{seed}_{image_mode}.mp4')
            render_video(G, path, [seed], (1, 1), 1, w_frames, truncation_psi, truncation_cutoff, image_mode, v, device, sample_mult, nrr, fps)


if __name__ == '__main__':
    generate_videos()
