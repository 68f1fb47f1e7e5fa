"""Reenact generated avatars with a tracked video (a driving folder).

    python reenact_avatar.py --drive_root=data/driving --grid=2x1 --seeds=166 --outdir=out --fname=reenact.mp4 --trunc=0.7
    python reenact_avatar.py --drive_root=data/driving --network=out/me/avatar.pkl --outdir=out   # invert.py's avatar

A driving folder holds dataset.json (a camera per frame), the frames, and per frame
<id>.obj + <id>_kpt2d.txt (see training/driving.py). Each output row shows the driving
frame followed by one avatar per seed: a WxH grid has H rows of W-1 avatars.
"""

import os

import click
import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import dnnlib
from dnnlib import cli
from torch_utils import host_memory
from training.driving import load_condition, read_driving_folder, smooth_labels
from training.generation import (BUNDLED_NETWORK, SEED_OPTIONS, avatar_latents, bundled_landmarks, frontal_label, load_network, make_grid,
                                 mesh_condition, options_given, to_uint8, uses_mesh)
from training.video import VideoWriter


def load_frame_image(path: str, size: int) -> np.ndarray:
    try:
        image = PIL.Image.open(path).convert('RGB')
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: unreadable driving frame ({e})') from e
    return np.asarray(image.resize((size, size), PIL.Image.LANCZOS))


@click.command()
@click.option('--drive_root', type=str, required=True, help='Driving folder (dataset.json, frames, <id>.obj, <id>_kpt2d.txt)')
@click.option('--network', 'network_pkl', default=BUNDLED_NETWORK, show_default=True, help='Network pickle (path): our network-snapshot-*.pkl or an official EG3D/Next3D pickle')
@click.option('--seeds', type=cli.Seeds(), default='0', show_default=True, help='Latent seeds: integers and ranges, comma-separated, e.g. 0-3,7')
@click.option('--projected-w', 'projected_w', type=click.Path(exists=True, dir_okay=False), default=None,
              help="An inverted avatar's latent (projected_w.npz of invert.py) instead of seeds; default: the projected_w an avatar snapshot holds")
@click.option('--grid', type=dnnlib.parse_vec2, default='2x1', show_default=True, metavar='WxH', help='Grid WxH: H rows of (driving frame + W-1 avatars)')
@click.option('--outdir', type=click.Path(file_okay=False), required=True, help='Output folder (created if missing)')
@click.option('--fname', type=str, default='reenact.mp4', show_default=True, help='Output video file name (.mp4) in --outdir')
@click.option('--trunc', 'truncation_psi', type=cli.FiniteFloat(), default=1.0, show_default=True, help='Truncation psi: 1 = none, 0 = the average w (the EG3D examples use 0.7)')
@click.option('--trunc-cutoff', 'truncation_cutoff', type=int, default=14, show_default=True, help="Truncate only the first N ws: 14 = the backbone's at full size (Next3D's texture ws after them stay untruncated)")
@click.option('--fixed_camera', type=bool, default=False, show_default=True, help='Render from a fixed frontal camera instead of the tracked one')
@click.option('--num_frames', type=click.IntRange(min=1), default=None, help='Use only the first N frames (default: all)')
@click.option('--lms_cond', type=bool, default=True, show_default=True, help='Use the <id>_kpt2d.txt landmarks (else computed from the mesh)')
@click.option('--smooth', type=click.IntRange(min=0), default=2, show_default=True, help='Camera smoothing radius in frames (0: none)')
@click.option('--fps', type=click.IntRange(min=1), default=30, show_default=True, help='Frames per second of the mp4 (integer; one driving frame per video frame)')
@click.option('--uv_mask_path', type=click.Path(exists=True, dir_okay=False), default=None, help='Face/eye UV mask PNG for official Next3D pickles that lack it')
@click.option('--device', type=str, default=None, help='torch device: cpu, cuda or cuda:N (default: cuda if available, else cpu)')
@cli.user_errors
def reenact(drive_root, network_pkl, seeds, projected_w, grid, outdir, fname, truncation_psi, truncation_cutoff, fixed_camera,
            num_frames, lms_cond, smooth, fps, uv_mask_path, device):
    """Drive avatars with a tracked video; writes OUTDIR/FNAME (mp4, 30 fps)."""
    host_memory.keep_freed_memory()      # CPU: freed tensors stay in the heap for the next ones
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    gw, gh = grid
    if fixed_camera and click.get_current_context().get_parameter_source('smooth') != click.core.ParameterSource.DEFAULT:
        raise click.UsageError('--smooth smooths the tracked cameras; it does not apply with --fixed_camera=true')
    if gw < 2:
        raise click.BadParameter('the grid needs at least 2 columns: the driving frame and one avatar', param_hint='--grid')
    frames = read_driving_folder(drive_root)
    if num_frames is not None:
        frames = frames[:num_frames]
    # Every mesh is read and checked before the network loads: a bad frame stops the run at once.
    conditions = [load_condition(frame.obj_path, frame.lms_path if lms_cond else None,
                                 landmarks_fn=None if lms_cond else bundled_landmarks) for frame in frames]
    data = load_network(network_pkl, device, uv_mask_path)
    G = data.G_ema
    if not uses_mesh(G):
        raise click.UsageError(f'{network_pkl}: this generator is not mesh-driven (EG3D) and cannot be reenacted')
    conditions = [mesh_condition(G, v, frame.obj_path, device) for v, frame in zip(conditions, frames)]
    avatars = (gw - 1) * gh
    ws = avatar_latents(G, data, network_pkl, projected_w, options_given(click.get_current_context(), SEED_OPTIONS))
    if ws is not None:      # an inverted avatar: its ws take the seeds' places
        ws, seeds = ws[torch.arange(avatars) % len(ws)], [0]
    else:
        seeds = [seeds[i % len(seeds)] for i in range(avatars)]
        c_cond = frontal_label(G, device=device)
        z = torch.from_numpy(np.stack([np.random.RandomState(s).randn(G.z_dim) for s in seeds])).float().to(device)
        with torch.no_grad():
            ws = G.mapping(z, c_cond.expand(len(z), -1), truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
    labels = np.stack([f.label for f in frames])
    cameras = smooth_labels(labels, smooth) if smooth > 0 else labels
    res = G.img_resolution
    path = os.path.join(outdir, fname)
    generator = torch.Generator(device).manual_seed(seeds[0])    # the renderer's depth sampling: same seeds, same frames
    with VideoWriter(path, fps=fps) as video:
        for i, frame in enumerate(tqdm(frames, desc='frames')):
            v = conditions[i]
            cam = frontal_label(G, device=device) if fixed_camera else torch.from_numpy(cameras[i])[None].to(device)
            with torch.no_grad():
                images = G.synthesis(ws, cam.expand(len(ws), -1), v.expand(len(ws), -1, -1), noise_mode='const',
                                     generator=generator)['image']
            tiles = to_uint8(images).reshape(gh, gw - 1, res, res, 3)
            driving = np.broadcast_to(load_frame_image(frame.image_path, res), (gh, 1, res, res, 3))
            rows = np.concatenate([driving, tiles], axis=1).reshape(gh * gw, res, res, 3)
            video.append(make_grid(rows, (gw, gh)))
    print(f'Wrote {len(frames)} frames to {path}')


if __name__ == '__main__':
    reenact()
