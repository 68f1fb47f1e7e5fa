"""Render a synthetic training set (or a driving video) from the bundled head model.

Training set (spec section 8 layout, R = --resolution):

    <outdir>/images{R}x{R}/00000/img00000000.png ...   RGB renders
    <outdir>/images{R}x{R}/dataset.json                {"labels": [[relpath, [25 floats]], ...]}
    <outdir>/meshes{R}x{R}/00000/img00000000.obj        canonical mesh (v lines only; faces in
                                                        data/head_model/head_template.obj)
    <outdir>/lms{R}x{R}/00000/img00000000.txt           68 x 3 canonical landmarks
    <outdir>/images{R}x{R}/dataset_exp.json            with --expression_labels: per image the head
                                                        model's expression coefficients then the jaw
                                                        axis-angle (n_exp + 3 floats, radians), as
                                                        preprocess_in_the_wild.py writes them; the
                                                        dataset appends them to D's label

Meshes are canonical (no head rotation): the random head pose is in the camera, drawn
like FFHQ's (yaw sd 0.3 rad, pitch sd 0.15 rad around frontal, radius 2.7, pivot
(0, 0, 0.2), focal 4.2647), and the head sits in the world at `coords.mesh_to_world`.

Driving video (--driving): <outdir>/frameNNNNN.png, frameNNNNN.obj, frameNNNNN_kpt2d.txt
and dataset.json, one identity with smooth head motion, talking and blinking.

Output depends only on --seed (and the sizes): each image draws from its own generator,
rendering runs single-threaded in each worker process.

    python dataset_preprocessing/synthetic/make_dataset.py --outdir=out --count=1000 --resolution=128 --seed=0
"""

import io
import json
import math
import multiprocessing
import os
import sys
import time

import click
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dataset_preprocessing.synthetic import scene        # noqa: E402
from dnnlib import cli                                    # noqa: E402
from torch_utils.persistence import atomic_write_bytes    # noqa: E402

CHUNK = 8                    # images rendered together; fixed, so batching never changes the output
MAX_DEFAULT_WORKERS = 8      # the default worker count: the cores available, at most this many
JAW_MAX = 0.3                # radians: the widest opening of a driving video's talking jaw
_topology = None             # per-process cache of scene.load_topology()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _replace_write(path: str, data: bytes):
    """Write through a temporary file and os.replace, so a file is never seen half-written.
    (No fsync per file: a dataset is rewritten from its seed if the machine crashes.)"""
    atomic_write_bytes(path, data, fsync=False)


def _png_bytes(image: torch.Tensor) -> bytes:
    """(3, H, W) float in [0, 1] -> PNG bytes (8 bit, rounded)."""
    arr = (image.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()


def _obj_bytes(verts: torch.Tensor) -> bytes:
    """(V, 3) metres -> OBJ text with v lines (micrometre precision)."""
    return (('v %.6f %.6f %.6f\n' * len(verts)) % tuple(verts.double().reshape(-1).tolist())).encode()


def _lms_bytes(lms: torch.Tensor) -> bytes:
    """(68, 3) -> one 'x y z' line per landmark."""
    return (('%.6f %.6f %.6f\n' * len(lms)) % tuple(lms.double().reshape(-1).tolist())).encode()


def _generator(seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _init_worker():
    global _topology
    torch.set_num_threads(1)
    _topology = scene.load_topology()


def _render_chunk(job):
    """Render and write images [start, stop); returns [(index, relpath, label list, expression list)]."""
    outdir, start, stop, resolution, seed = job
    topo = _topology
    samples = [scene.draw_sample(topo, _generator(seed, i)) for i in range(start, stop)]
    labels = torch.stack([scene.camera_label(s.yaw, s.pitch) for s in samples])
    verts, lms = scene.pose_meshes(topo, samples)
    images = scene.render(topo, samples, verts, labels, resolution)
    res = f'{resolution}x{resolution}'
    out = []
    for k, i in enumerate(range(start, stop)):
        rel = f'{i // 1000:05d}/img{i:08d}'
        _replace_write(os.path.join(outdir, f'images{res}', rel + '.png'), _png_bytes(images[k]))
        _replace_write(os.path.join(outdir, f'meshes{res}', rel + '.obj'), _obj_bytes(verts[k]))
        _replace_write(os.path.join(outdir, f'lms{res}', rel + '.txt'), _lms_bytes(lms[k]))
        s = samples[k]
        out.append((i, rel + '.png', [float(x) for x in labels[k]], [float(x) for x in s.expression] + [s.jaw, 0.0, 0.0]))
    return out


def _run_jobs(jobs, workers: int):
    workers = min(workers, len(jobs))
    if workers <= 1:
        _init_worker()
        for job in jobs:
            yield _render_chunk(job)
        return
    ctx = multiprocessing.get_context('spawn')
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_render_chunk, jobs)


def make_training_set(outdir: str, count: int, resolution: int, seed: int, workers: int = 2, progress: bool = False,
                      expression_labels: bool = False):
    jobs = [(outdir, s, min(s + CHUNK, count), resolution, seed) for s in range(0, count, CHUNK)]
    entries = []
    with tqdm(total=count, desc='images', unit='img', disable=not progress) as bar:
        for chunk in _run_jobs(jobs, workers):
            entries.extend(chunk)
            bar.update(len(chunk))
    entries.sort()
    res = f'{resolution}x{resolution}'
    data = json.dumps({'labels': [[rel, label] for _, rel, label, _ in entries]}, indent=0)
    _replace_write(os.path.join(outdir, f'images{res}', 'dataset.json'), data.encode())
    if expression_labels:
        data = json.dumps({'labels': [[rel, exp] for _, rel, _, exp in entries]}, indent=0)
        _replace_write(os.path.join(outdir, f'images{res}', 'dataset_exp.json'), data.encode())


def talking_jaw(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Speech-like jaw opening (T,) in radians at times t (T,) in seconds, from t = 0.

    Phrases of 3-6 syllables separated by 0.3-0.6 s pauses; a syllable lasts 0.24-0.34 s
    and opens the jaw by a sin^2 bump of height 0.1-0.25 rad, except the second syllable
    of each phrase (stressed), which opens it to JAW_MAX. The clip starts with a phrase,
    so even a one-second clip opens the mouth wide. The steepest change is
    JAW_MAX * pi / 0.24 s, 0.13 rad per frame at 30 fps.
    """
    jaw = torch.zeros_like(t)
    start = 0.0
    while start < float(t[-1]):
        for k in range(int(torch.randint(3, 7, (), generator=g))):
            length = 0.24 + 0.1 * float(torch.rand((), generator=g))
            height = 0.1 + 0.15 * float(torch.rand((), generator=g))
            if k == 1:
                height = JAW_MAX
            u = ((t - start) / length).clamp(0, 1)
            jaw = torch.maximum(jaw, height * torch.sin(math.pi * u) ** 2)
            start += length
        start += 0.3 + 0.3 * float(torch.rand((), generator=g))
    return jaw


def driving_motion(num_frames: int, g: torch.Generator, fps: float = 30.0):
    """Smooth per-frame yaw, pitch, jaw opening (radians) and blink weight: dict of (T,) tensors."""
    t = torch.arange(num_frames, dtype=torch.float64) / fps
    ph = torch.rand(3, generator=g, dtype=torch.float64) * 2 * math.pi
    yaw = math.pi / 2 + 0.25 * torch.sin(2 * math.pi * 0.17 * t + ph[0]) + 0.05 * torch.sin(2 * math.pi * 0.5 * t + ph[1])
    pitch = math.pi / 2 + 0.07 * torch.sin(2 * math.pi * 0.23 * t + ph[2])
    jaw = talking_jaw(t, g)
    # Blinks: ~0.15 s closures every 2-4 s.
    blink = torch.zeros(num_frames, dtype=torch.float64)
    next_blink = float(torch.rand((), generator=g)) * 2
    while next_blink < t[-1] + 1:
        blink = torch.maximum(blink, torch.exp(-((t - next_blink) / 0.06) ** 2))
        next_blink += 2 + 2 * float(torch.rand((), generator=g))
    return dict(yaw=yaw, pitch=pitch, jaw=jaw, blink=blink)


def make_driving_video(outdir: str, num_frames: int, resolution: int, seed: int, progress: bool = False):
    torch.set_num_threads(1)
    topo = scene.load_topology()
    g = _generator(seed, 0)
    base = scene.draw_sample(topo, g)
    motion = driving_motion(num_frames, g)
    # Expression: cosine blend between keyframes every second.
    keys = torch.randn(num_frames // 30 + 2, topo.flame.n_exp, generator=g) * 0.35
    labels = []
    bar = tqdm(total=num_frames, desc='frames', unit='frame', disable=not progress)
    for start in range(0, num_frames, CHUNK):
        samples = []
        for f in range(start, min(start + CHUNK, num_frames)):
            k, w = divmod(f / 30, 1)
            w = (1 - math.cos(math.pi * w)) / 2
            exp = keys[int(k)] * (1 - w) + keys[int(k) + 1] * w
            for c in scene.BLINK_COMPONENTS:
                exp[c] = 1.6 * float(motion['blink'][f])
            samples.append(scene.Sample(base.shape, exp, float(motion['jaw'][f]), float(motion['yaw'][f]),
                                        float(motion['pitch'][f]), base.texture_seed, base.hair, base.iris, base.light,
                                        base.light_strength, base.ambient, base.background_seed))
        cams = torch.stack([scene.camera_label(s.yaw, s.pitch) for s in samples])
        verts, lms = scene.pose_meshes(topo, samples)
        images = scene.render(topo, samples, verts, cams, resolution)
        for k, f in enumerate(range(start, start + len(samples))):
            name = f'frame{f:05d}'
            _replace_write(os.path.join(outdir, name + '.png'), _png_bytes(images[k]))
            _replace_write(os.path.join(outdir, name + '.obj'), _obj_bytes(verts[k]))
            _replace_write(os.path.join(outdir, name + '_kpt2d.txt'), _lms_bytes(lms[k]))
            labels.append([name + '.png', [float(x) for x in cams[k]]])
        bar.update(len(samples))
    bar.close()
    _replace_write(os.path.join(outdir, 'dataset.json'), json.dumps({'labels': labels}, indent=0).encode())


@click.command()
@click.option('--outdir', required=True, type=click.Path(file_okay=False),
              help='Output folder (created; files of the same names are replaced)')
@click.option('--count', type=click.IntRange(min=1), default=1000, show_default=True, help='Number of training images')
@click.option('--resolution', type=click.IntRange(min=8), default=128, show_default=True, help='Image width and height in pixels')
@click.option('--seed', type=click.IntRange(min=0), default=0, show_default=True,
              help='Random seed; the output depends only on it and the sizes')
@click.option('--driving', is_flag=True, help='Write a driving video folder (frames, meshes, landmarks, dataset.json) instead of a training set')
@click.option('--num_frames', type=click.IntRange(min=1), default=120, show_default=True, help='Frames of the driving video (30 per second)')
@click.option('--workers', type=click.IntRange(min=1), default=None, show_default=f'the cores available, at most {MAX_DEFAULT_WORKERS}',
              help='Rendering processes for a training set; more than the cores only slows each down')
@click.option('--expression_labels', is_flag=True,
              help="Also write dataset_exp.json (each image's expression coefficients and jaw axis-angle), which D then sees")
@cli.user_errors
def main(outdir, count, resolution, seed, driving, num_frames, workers, expression_labels):
    """Render a synthetic dataset of the bundled head model."""
    ctx = click.get_current_context()
    unused = ('count', 'workers', 'expression_labels') if driving else ('num_frames',)
    for name in unused:
        if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f'--{name} applies to {"a training set (without --driving)" if driving else "--driving"} only')
    cores = available_cores()
    if workers is None:
        workers = min(cores, MAX_DEFAULT_WORKERS)
    elif workers > cores:
        click.echo(f'Warning: --workers={workers} exceeds the cores available ({cores}): the workers share them '
                   '(same output, no faster)', err=True)
    t0 = time.time()
    if driving:
        make_driving_video(outdir, num_frames, resolution, seed, progress=True)
        print(f'{num_frames} driving frames at {resolution}x{resolution} in {time.time() - t0:.1f} s -> {outdir}')
    else:
        make_training_set(outdir, count, resolution, seed, workers, progress=True, expression_labels=expression_labels)
        print(f'{count} images at {resolution}x{resolution} in {time.time() - t0:.1f} s -> {outdir}')


if __name__ == '__main__':
    main()
