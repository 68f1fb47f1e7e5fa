"""The main job on bundled defaults (`make demo`): from the bundled model, on a CPU in a
few minutes, write into OUTDIR

    samples/seed0000.png ...     a seed grid: three views per seed
    samples/seed0000.mrc         a density volume (view it at the level gen_samples.py prints)
    samples/depth.png            depth images of the same seeds
    orbit/interpolation.mp4      an orbit video with latent interpolation
    reenact/reenact.mp4          avatars driven by the bundled synthetic driving folder

Each step calls the command-line script a user would call, with the arguments printed.
"""

import os
import subprocess
import sys
import time

import click

from dnnlib import cli

ROOT = os.path.dirname(os.path.abspath(__file__))
NETWORK = os.path.join('pretrained_models', 'next3d-synthetic64.pkl')
DRIVING = os.path.join('data', 'driving')


def run(args: list):
    print('$ python ' + ' '.join(args), flush=True)
    try:
        subprocess.run([sys.executable] + args, cwd=ROOT, check=True)
    except subprocess.CalledProcessError as e:
        raise click.ClickException(f'python {" ".join(args)} failed with exit status {e.returncode} (its error is above)') from e


def save_depth_grid(network: str, seeds: list, path: str):
    """Depth images of `seeds` from a frontal camera (near = bright)."""
    import numpy as np
    import torch
    from training.generation import depth_to_image, frontal_label, load_generator, mesh_condition, read_mesh_condition, save_image_grid
    G = load_generator(network, torch.device('cpu'))
    v = mesh_condition(G, read_mesh_condition())
    c = frontal_label(G)
    depths = []
    with torch.no_grad():
        for seed in seeds:
            z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).float()
            generator = torch.Generator().manual_seed(seed)          # the renderer's depth sampling, as gen_samples
            depths.append(depth_to_image(G(z, c, v, truncation_psi=0.7, noise_mode='const', generator=generator)['image_depth']))
    save_image_grid(torch.cat(depths), path, grid=(len(seeds), 1))


@click.command()
@click.option('--outdir', type=click.Path(file_okay=False), default='out', show_default=True, help='Output folder (created if missing): samples/, orbit/ and reenact/ go inside')
@click.option('--network', default=NETWORK, show_default=True, help='Network pickle (path) to demonstrate')
@cli.user_errors
def main(outdir: str, network: str):
    """Images, a shape and videos from the bundled model."""
    start = time.time()
    outdir = os.path.abspath(outdir)
    if not os.path.isfile(os.path.join(ROOT, network)) and not os.path.isfile(network):
        raise click.ClickException(f'{network}: no such network file (see pretrained_models/README.md for how it is trained)')
    run(['gen_samples.py', f'--network={network}', '--seeds=0-3', '--trunc=0.7', '--shapes=true', '--shape-res=128',
         f'--outdir={os.path.join(outdir, "samples")}'])
    save_depth_grid(network, [0, 1, 2, 3], os.path.join(outdir, 'samples', 'depth.png'))
    run(['gen_videos.py', f'--network={network}', '--seeds=0-1', '--grid=1x1', '--num-keyframes=2', '--w-frames=24',
         '--trunc=0.7', '--fps=24', f'--outdir={os.path.join(outdir, "orbit")}'])
    run(['reenact_avatar.py', f'--drive_root={DRIVING}', f'--network={network}', '--seeds=0-1', '--grid=3x1',
         '--trunc=0.7', f'--outdir={os.path.join(outdir, "reenact")}', '--fname=reenact.mp4'])
    print(f'\ndemo: done in {time.time() - start:.0f} s. Results in {outdir}:')
    for folder, _, files in sorted(os.walk(outdir)):
        for name in sorted(files):
            print('  ' + os.path.relpath(os.path.join(folder, name), os.getcwd()))


if __name__ == '__main__':
    main()
