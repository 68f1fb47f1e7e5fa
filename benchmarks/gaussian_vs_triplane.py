"""The Gaussian generator against the tri-plane (Next3D) generator: render time per image at
equal output resolution, and a short training of both side by side at an equal CPU budget.

    # Time per image, presets tiny64 / small128 / ffhq512 and their -gaussian twins (bundled head topology)
    python benchmarks/gaussian_vs_triplane.py speed --sizes 64,128,512 --threads 1

    # Both trained on the same data until each has used 25 CPU-minutes (one thread each, run
    # together so that both see the same machine load), then measured with calc_metrics.py
    python benchmarks/gaussian_vs_triplane.py train --data datasets/synthetic64 --cpu-minutes 25 \\
        --outdir training-runs/gaussian_vs_triplane --metrics mesh_depth_err,fid_tiny

`speed` times G(z, c, v) (everything: mapping, synthesis networks, mesh rasterization or
Gaussian placement, rendering, super-resolution) and the render of a new camera for the same
latent and mesh (`use_cached_backbone`: volume rendering + super-resolution, or splatting +
background), batch 1, no gradients, median CPU and wall seconds. Untrained weights: a
trained Gaussian generator's splats are smaller, so its splatting is faster than measured here.
Results: benchmarks/results/gaussian_vs_triplane-{speed,train}-<device>-<date>.{md,json}.
"""

import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, ROOT, device_name, git_commit, load_average, timed   # noqa: E402
from training import configs, coords                                                          # noqa: E402
from training.driving import DEFAULT_LMS, DEFAULT_OBJ, load_condition                          # noqa: E402

PAIRS = {64: ('tiny64', 'tiny64-gaussian'), 128: ('small128', 'small128-gaussian'), 512: ('ffhq512', 'ffhq512-gaussian')}


def _today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')


def _write(name: str, markdown: str, data: dict):
    os.makedirs(RESULTS_DIR, exist_ok=True)
    for ext, text in (('md', markdown), ('json', json.dumps(data, indent=2) + '\n')):
        with open(os.path.join(RESULTS_DIR, f'{name}.{ext}'), 'w') as f:
            f.write(text)
    print(f'Wrote {os.path.relpath(os.path.join(RESULTS_DIR, name), ROOT)}.md/.json')


@click.group()
def main():
    """Gaussian vs tri-plane generator benchmarks."""


# ----------------------------------------------------------------------------------------------
# Render time

def time_generator(cfg: str, device: torch.device, repeats: int) -> dict:
    """Median (wall, CPU) seconds per image of the preset's G, full forward and new-camera render."""
    torch.manual_seed(0)
    G = configs.make_generator(cfg, template_obj=configs.BUNDLED_TEMPLATE, device=device).eval().requires_grad_(False)
    v = load_condition(DEFAULT_OBJ, DEFAULT_LMS).to(device)
    c = coords.make_label(coords.cam2world_look_at(torch.tensor([math.pi / 2]), torch.tensor([math.pi / 2]))).to(device)
    c2 = coords.make_label(coords.cam2world_look_at(torch.tensor([math.pi / 2 + 0.3]), torch.tensor([math.pi / 2]))).to(device)
    z = torch.randn(1, G.z_dim, device=device)
    with torch.no_grad():
        ws = G.mapping(z, c)
        G.synthesis(ws, c, v, noise_mode='const', cache_backbone=True)
        full = timed(lambda: G(z, c, v, noise_mode='const'), device, repeats, cpu_time=True)
        render = timed(lambda: G.synthesis(ws, c2, v, noise_mode='const', use_cached_backbone=True), device, repeats, cpu_time=True)
    extra = {}
    if hasattr(G, 'rasterizer') and hasattr(G.rasterizer, 'num_gaussians'):
        extra['gaussians'] = G.rasterizer.num_gaussians
    return dict(cfg=cfg, generator=type(G).__name__, img_resolution=G.img_resolution, raw_resolution=G.neural_rendering_resolution,
                parameters=sum(p.numel() for p in G.parameters()), full_wall=full[0], full_cpu=full[1],
                render_wall=render[0], render_cpu=render[1], **extra)


@main.command()
@click.option('--sizes', default='64,128', show_default=True, help=f'Output resolutions to compare, from {sorted(PAIRS)}')
@click.option('--repeats', default=3, show_default=True, type=click.IntRange(min=1), help='Timed repetitions (median reported)')
@click.option('--threads', default=1, show_default=True, type=click.IntRange(min=1), help='torch CPU threads')
@click.option('--device', default='cpu', show_default=True, help='torch device')
def speed(sizes, repeats, threads, device):
    """Seconds per image of each pair of presets at the same output resolution."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    try:
        resolutions = [int(s) for s in sizes.split(',')]
    except ValueError:
        raise click.BadParameter(f'{sizes!r}: expected comma-separated resolutions from {sorted(PAIRS)}', param_hint='--sizes')
    bad = [r for r in resolutions if r not in PAIRS]
    if bad:
        raise click.BadParameter(f'{bad}: choose from {sorted(PAIRS)}', param_hint='--sizes')
    load_before, start = load_average(), time.time()
    rows = []
    for res in resolutions:
        for cfg in PAIRS[res]:
            row = time_generator(cfg, device, repeats)
            print(json.dumps(row))
            rows.append(row)
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), device=device_name(device),
                torch=torch.__version__, commit=git_commit('training', 'benchmarks'), repeats=repeats,
                load_before=load_before, load_after=load_average(), seconds=round(time.time() - start))
    lines = [f'# Render time per image: Gaussian vs tri-plane generator, {info["device"]}', '',
             f'- date: {info["date"]}; torch {info["torch"]}; git commit {info["commit"]}',
             f'- batch 1, no gradients, noise const, untrained weights (seed 0), the bundled head topology and its '
             f'neutral mesh, frontal camera; median of {repeats} runs after one warm-up',
             f'- system load average (1 min) before / after: {load_before:.1f} / {info["load_after"]:.1f} on {os.cpu_count()} CPUs',
             '- "G(z, c, v)": the whole generator; "new camera": the same latent and mesh from another camera '
             '(`use_cached_backbone`: volume rendering + super-resolution, or splatting + background)', '',
             '| output | generator | raw render | parameters | Gaussians | G(z, c, v) CPU s | wall s | new camera CPU s | wall s |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["img_resolution"]} | {r["cfg"]} | {r["raw_resolution"]} | {r["parameters"]:,} | {r.get("gaussians", "-")} | '
                     f'{r["full_cpu"]:.3f} | {r["full_wall"]:.3f} | {r["render_cpu"]:.3f} | {r["render_wall"]:.3f} |')
    lines += ['', f'Command: `python benchmarks/gaussian_vs_triplane.py speed --sizes {sizes} --repeats {repeats} --threads {threads}`', '']
    tag = 'cpu' if device.type == 'cpu' else 'cuda'
    _write(f'gaussian_vs_triplane-speed-{tag}-{_today()}', '\n'.join(lines), dict(info=info, rows=rows))


# ----------------------------------------------------------------------------------------------
# Training at an equal CPU budget

def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children (Linux /proc)."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])          # utime, stime, cutime, cstime
    return ticks / os.sysconf('SC_CLK_TCK')


def train_with_budget(cfgs, data: str, outdir: str, budget_s: float, batch: int, extra_args) -> dict:
    """Start one train.py per preset (one thread each, together); SIGTERM each when its CPU time
    reaches the budget (train.py then writes a resume snapshot). -> {cfg: (run dir, cpu s)}."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    procs = {}
    for cfg in cfgs:
        args = [sys.executable, os.path.join(ROOT, 'train.py'), '--outdir', os.path.join(outdir, cfg), '--cfg', cfg, '--data', data,
                '--gpus', '1', '--batch', str(batch), '--gamma', '1', '--kimg', '100000', '--tick', '0.5', '--snap', '2',
                '--workers', '0', '--metrics', 'none', '--gen_pose_cond', 'True', '--blur_fade_kimg', '8', *extra_args]
        log = open(os.path.join(outdir, f'{cfg}.log'), 'w')
        procs[cfg] = (subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    used, stopped = {}, set()
    while procs:
        time.sleep(5)
        for cfg, (proc, log) in list(procs.items()):
            if proc.poll() is not None:
                log.close()
                del procs[cfg]
                if proc.returncode != 0:
                    raise click.ClickException(f'train.py --cfg={cfg} failed (exit {proc.returncode}): see {log.name}')
                continue
            try:
                used[cfg] = process_cpu_seconds(proc.pid)
            except OSError:
                continue
            if used[cfg] >= budget_s and cfg not in stopped:
                proc.send_signal(signal.SIGTERM)
                stopped.add(cfg)
    runs = {}
    for cfg in cfgs:
        root = os.path.join(outdir, cfg)
        run_dir = os.path.join(root, sorted(os.listdir(root))[-1])
        runs[cfg] = (run_dir, used.get(cfg, float('nan')))
    return runs


def last_snapshot(run_dir: str) -> str:
    snaps = sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot-') and f.endswith('.pkl'))
    if not snaps:
        raise click.ClickException(f'{run_dir}: no snapshot was written')
    return os.path.join(run_dir, snaps[-1])


def measure(snapshot: str, metrics) -> dict:
    """calc_metrics.py results {name: value} of one snapshot ('error: ...' for a metric that fails)."""
    out = {}
    for metric in metrics:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'calc_metrics.py'), '--network', snapshot, '--metrics', metric],
                              cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
        if proc.returncode != 0:
            out[metric] = 'error: ' + (proc.stdout + proc.stderr).strip().splitlines()[-1][:200]
            continue
        path = os.path.join(os.path.dirname(snapshot), f'metric-{metric}.jsonl')
        with open(path) as f:
            record = json.loads(f.read().strip().splitlines()[-1])
        out.update(record['results'])
    return out


def kimg_of(snapshot: str) -> float:
    return float(os.path.basename(snapshot)[len('network-snapshot-'):-len('.pkl')])


@main.command()
@click.option('--data', required=True, type=click.Path(exists=True), help='Training set (SPEC layout folder or zip), 64x64 for the tiny presets')
@click.option('--outdir', required=True, type=click.Path(file_okay=False), help='Run folders go to <outdir>/<preset>/')
@click.option('--cpu-minutes', default=25.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help='CPU budget of each run')
@click.option('--pair', default='tiny64', show_default=True, type=click.Choice(['tiny64', 'small128']), help='Tri-plane preset (its -gaussian twin runs beside it)')
@click.option('--batch', default=8, show_default=True, type=click.IntRange(min=1), help='Batch size of both runs')
@click.option('--metrics', default='mesh_depth_err,fid_tiny', show_default=True, help='calc_metrics.py metrics of the last snapshots')
def train(data, outdir, cpu_minutes, pair, batch, metrics):
    """Train the tri-plane preset and its Gaussian twin for the same CPU time; measure both."""
    cfgs = (pair, f'{pair}-gaussian')
    os.makedirs(outdir, exist_ok=True)
    start, load_before = time.time(), load_average()
    runs = train_with_budget(cfgs, data, outdir, cpu_minutes * 60, batch, [])
    metric_names = [m for m in metrics.split(',') if m]
    rows = []
    for cfg, (run_dir, cpu) in runs.items():
        snapshot = last_snapshot(run_dir)
        row = dict(cfg=cfg, kimg=kimg_of(snapshot), cpu_seconds=round(cpu), snapshot=os.path.relpath(snapshot, outdir),
                   **measure(snapshot, metric_names))
        print(json.dumps(row))
        rows.append(row)
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), torch=torch.__version__,
                commit=git_commit('training', 'benchmarks'), data=os.path.basename(os.path.normpath(data)), batch=batch,
                cpu_minutes=cpu_minutes, wall_minutes=round((time.time() - start) / 60), load_before=load_before, load_after=load_average())
    names = sorted({k for r in rows for k in r} - {'cfg', 'kimg', 'cpu_seconds', 'snapshot'})
    lines = [f'# Gaussian vs tri-plane generator: {cpu_minutes:g} CPU-minutes of training each', '',
             f'- date: {info["date"]}; torch {info["torch"]}; git commit {info["commit"]}',
             f'- data: {info["data"]}; batch {batch}, gamma 1, --gen_pose_cond True, --blur_fade_kimg 8, one thread each, '
             f'both runs at the same time ({info["wall_minutes"]} wall minutes); system load {load_before:.1f} / {info["load_after"]:.1f} '
             f'on {os.cpu_count()} CPUs', '- each run stopped with SIGTERM once its process had used the budget; metrics of its last snapshot', '',
             '| preset | kimg reached | CPU s | ' + ' | '.join(names) + ' |', '|---|---|---|' + '---|' * len(names)]
    for r in rows:
        cells = [f'{r[n]:.4g}' if isinstance(r.get(n), float) else str(r.get(n, '-')) for n in names]
        lines.append(f'| {r["cfg"]} | {r["kimg"]:g} | {r["cpu_seconds"]} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'Command: `python benchmarks/gaussian_vs_triplane.py train --data <{info["data"]}> --outdir <runs> '
              f'--cpu-minutes {cpu_minutes:g} --pair {pair} --batch {batch} --metrics {metrics}`', '']
    _write(f'gaussian_vs_triplane-train-{pair}-cpu-{_today()}', '\n'.join(lines), dict(info=info, rows=rows))


if __name__ == '__main__':
    main()
