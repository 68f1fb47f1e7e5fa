"""End-to-end training speed with and without `train.py --geometry-in-loader`.

The training step without its rasterization (`train_step.py --geometry-in-loader`) is the
best case; whether the data loader's workers keep up, and whether they take cores from the
step, shows only end to end. This renders a small synthetic training set from the bundled
head model into a temporary folder, runs `train.py` on it with and without the option
(alternating, `--repeats` times each; the device is train.py's: the GPU where there is
one), and reports the seconds per kimg of each run's ticks after the first (which holds
the start-up).

Prints a markdown table and writes it to benchmarks/results/loader_geometry-<preset>-<device>-<date>.md.

    python benchmarks/loader_geometry.py --cfg small128 --batch 8 --workers 3
"""

import datetime
import os
import re
import subprocess
import sys
import tempfile

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, device_name, git_commit, load_average, write_result   # noqa: E402
from dataset_preprocessing.synthetic.make_dataset import make_training_set                # noqa: E402
from training import configs                                                               # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = re.compile(r'^tick (\d+) .*sec/kimg ([0-9.]+)', re.MULTILINE)
# Next3D presets that train on the bundled head model (what the synthetic set is rendered from).
PRESETS = sorted(name for name, p in configs.PRESETS.items() if p['generator'] == 'next3d' and configs.default_template(name))


def run_train(data: str, outdir: str, cfg: str, batch: int, workers: int, kimg: float, tick: float, geometry: bool) -> list:
    """s/kimg of the ticks after the first of one train.py run."""
    args = [sys.executable, os.path.join(ROOT, 'train.py'), '--outdir', outdir, '--cfg', cfg, '--data', data, '--gpus', '1',
            '--batch', str(batch), '--gamma', '1', '--kimg', f'{kimg:g}', '--tick', f'{tick:g}', '--snap', '1000000',
            '--metrics', 'none', '--grid', '1x1', '--workers', str(workers)] + (['--geometry-in-loader'] if geometry else [])
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise click.ClickException(f'train.py failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}')
    ticks = [float(s) for n, s in TICK.findall(proc.stdout) if int(n) > 0]
    if not ticks:
        raise click.ClickException(f'train.py reported no tick after the first: make --kimg ({kimg:g}) at least twice --tick ({tick:g})')
    return ticks


@click.command()
@click.option('--cfg', help='Network preset (Next3D, bundled head model)', type=click.Choice(PRESETS), default='small128', show_default=True)
@click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--workers', help="train.py's --workers", type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--kimg', help='Length of each run (kimg)', type=click.FloatRange(min=0, min_open=True), default=0.128, show_default=True)
@click.option('--tick', help='Tick length (kimg)', type=click.FloatRange(min=0, min_open=True), default=0.032, show_default=True)
@click.option('--repeats', help='Runs with and without the option, alternating', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--outdir', help='Where to write the result', default=RESULTS_DIR, show_default='benchmarks/results')
def main(cfg, batch, workers, kimg, tick, repeats, outdir):
    """Time train.py with and without --geometry-in-loader."""
    resolution = configs.PRESETS[cfg]['G']['img_resolution']
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, 'data')
        make_training_set(data, count=max(16, 2 * batch), resolution=resolution, seed=0, workers=min(workers, os.cpu_count() or 1))
        for i in range(repeats):
            for geometry in (True, False) if i % 2 == 0 else (False, True):
                ticks = run_train(data, os.path.join(tmp, f'run{len(rows)}'), cfg, batch, workers, kimg, tick, geometry)
                rows.append(('--geometry-in-loader' if geometry else 'in the step', ticks))
    medians = {mode: float(np.median([s for m, ticks in rows if m == mode for s in ticks])) for mode in ('--geometry-in-loader', 'in the step')}
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f'# train.py with and without --geometry-in-loader: {cfg}, batch {batch}, {device_name(device)}', '',
        f'- command: `python benchmarks/loader_geometry.py --cfg {cfg} --batch {batch} --workers {workers} --kimg {kimg:g} '
        f'--tick {tick:g} --repeats {repeats}`',
        f'- date: {now:%Y-%m-%d %H:%M} UTC; git commit: {git_commit()}; torch {torch.__version__}; {os.cpu_count()} CPUs',
        f'- system load average (1 min) before / after: {load_before:.1f} / {load_average():.1f}',
        f'- each run: train.py --workers {workers} on {max(16, 2 * batch)} synthetic images; s/kimg of its ticks after the first', '',
        '| meshes rasterized | run | s/kimg of the ticks |', '|---|---|---|',
    ] + [f'| {mode} | {i + 1} | {", ".join(f"{s:.1f}" for s in ticks)} |' for i, (mode, ticks) in enumerate(rows)] + [
        '', f'Median s/kimg: in the loader\'s workers {medians["--geometry-in-loader"]:.1f}, in the step {medians["in the step"]:.1f} '
        f'(ratio {medians["--geometry-in-loader"] / medians["in the step"]:.3f}).', '']
    text = '\n'.join(lines)
    print(text)
    write_result(outdir, f'loader_geometry-{cfg}-{device.type}-{now:%Y-%m-%d-%H%M}.md', text)


if __name__ == '__main__':
    main()
