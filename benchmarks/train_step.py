"""Training speed: seconds per kimg and peak memory of full training steps for a preset.

A step is what the training loop runs for one batch: G main phase, D main phase, and the
lazy density (every 4th) and R1 (every 16th) phases at their amortised rate (each lazy
phase is timed once and weighted 1/interval), all with the preset's networks, the loss
of training/loss.py, and Adam. Inputs are synthetic (random images and cameras on EG3D's
orbit; the bundled head model's mesh for Next3D presets), so no dataset is needed.

`--compile D|G|all` adds a column: the same phases with those networks through torch.compile
(torch_utils/compiled.py), timed interleaved with the eager ones on the same networks, and
the compile time (the checked first calls) reported; `--compile-backend` picks its backend
(`--compile all --compile-backend cudagraphs`: D, G's synthesis and its density query replayed
as CUDA graphs).

`--geometry-in-loader` adds a column for Next3D presets: the same phases given the meshes'
geometry made beforehand (G.mesh_geometry, what training_loop.GeometryCollate makes
in the data loader's workers under train.py --geometry-in-loader), i.e. the step without
its rasterization.

`--profile PHASE` runs that phase once more under torch.profiler and adds its top ops with
their input shapes (by time on the GPU, or CPU time on the CPU) and, on a GPU, its top
kernels and their count: where a phase's time goes, convolution by convolution.

Prints a markdown table and writes it to benchmarks/results/train_step-<preset>-<device>-<date>.md.

    python benchmarks/train_step.py --cfg small128 --batch 4 --device cpu
    python benchmarks/train_step.py --cfg tiny64 --batch 8 --threads 1 --compile D
    python benchmarks/train_step.py --cfg ffhq512 --batch 4 --device cuda --template data/flame/head_template.obj
    python benchmarks/train_step.py --cfg small128 --batch 32 --device cuda --profile Dreg
    python benchmarks/train_step.py --cfg small128 --batch 8 --device cuda --compile all --compile-backend cudagraphs
"""

import datetime
import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, device_name, git_commit, load_average, peak_memory_gib, sync, write_result   # noqa: E402
from torch_utils import compiled, host_memory             # noqa: E402
from training import configs, coords                      # noqa: E402
from training import loss as loss_lib                     # noqa: E402
from training.mesh import obj_io                          # noqa: E402
from training.training_loop import setup_phases           # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANDMARKS = os.path.join(ROOT, 'data', 'head_model', 'neutral_lms.txt')


def make_inputs(G, batch: int, template: str, device):
    """Random real images in [-1, 1], orbit cameras, and the template mesh + landmarks for every sample."""
    rnd = np.random.RandomState(0)
    yaw = torch.from_numpy(np.pi / 2 + rnd.uniform(-0.4, 0.4, batch)).float()
    pitch = torch.from_numpy(np.pi / 2 + rnd.uniform(-0.2, 0.2, batch)).float()
    c = coords.make_label(coords.cam2world_look_at(yaw, pitch)).to(device)
    real = torch.rand([batch, 3, G.img_resolution, G.img_resolution], device=device) * 2 - 1
    num_vertices = getattr(G, 'num_vertices', 5023)
    if template is not None:
        verts = obj_io.read_obj_vertices(template)
        lms = obj_io.read_landmarks(LANDMARKS) if os.path.isfile(LANDMARKS) and len(verts) == num_vertices else np.zeros([68, 3], np.float32)
    else:
        verts, lms = np.zeros([num_vertices, 3], np.float32), np.zeros([68, 3], np.float32)
    v = torch.from_numpy(np.concatenate([verts, lms]).astype(np.float32))[None].repeat(batch, 1, 1).to(device)
    return real, c, v


def time_phase(losses, phase, module, opt, inputs, z_dim, device, repeats, geometries=None):
    """Median seconds of one phase (zero_grad, accumulate, step) for each loss, the losses interleaved.
    geometries: for each loss, the meshes' geometry to give it (see --geometry-in-loader) or None."""
    real, c, v = inputs
    times = [[] for _ in losses]
    for _ in range(repeats):
        for loss, geometry, t in zip(losses, geometries or [None] * len(losses), times):
            z = torch.randn([len(real), z_dim], device=device)
            sync(device)
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            module.requires_grad_(True)
            loss.accumulate_gradients(phase, real, c, v, z, c, v, gain=1, cur_nimg=10**7, gen_geometry=geometry)
            module.requires_grad_(False)
            opt.step()
            sync(device)
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def profile_phase(loss, phase, inputs, z_dim, device, top: int = 15) -> list:
    """Markdown lines: one run of `phase` under torch.profiler, its top ops by input shape and (GPU) kernels."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = device.type == 'cuda'
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []), record_shapes=True) as prof:
        time_phase([loss], phase.name, phase.module, phase.opt, inputs, z_dim, device, 1)
    device_time = lambda e: (getattr(e, 'self_device_time_total', None) or getattr(e, 'self_cuda_time_total', 0)) / 1e3
    cost = device_time if on_gpu else (lambda e: e.self_cpu_time_total / 1e3)
    unit = 'GPU ms (kernels it launched)' if on_gpu else 'self CPU ms'
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.device_type == torch.autograd.DeviceType.CPU and cost(e) > 0]
    ops.sort(key=lambda e: -cost(e))
    lines = [f'### {phase.name}: top {top} ops by {unit}, with their input shapes (one run, total {sum(cost(e) for e in ops):.1f} ms)', '',
             f'| op | input shapes | calls | {unit} |', '|---|---|---|---|']
    lines += [f'| `{e.key}` | `{str(e.input_shapes)[:160]}` | {e.count} | {cost(e):.2f} |' for e in ops[:top]] + ['']
    if on_gpu:
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and device_time(e) > 0]
        kernels.sort(key=lambda e: -device_time(e))
        lines += [f'### {phase.name}: top {top} GPU kernels ({sum(e.count for e in kernels):,} launches, '
                  f'{sum(device_time(e) for e in kernels):.1f} ms on the device)', '', '| kernel | calls | GPU ms |', '|---|---|---|']
        lines += [f'| `{e.key[:160]}` | {e.count} | {device_time(e):.2f} |' for e in kernels[:top]] + ['']
    return lines


@click.command()
@click.option('--cfg', help='Network preset', type=click.Choice(sorted(configs.PRESETS)), default='small128', show_default=True)
@click.option('--batch', help='Batch size of one step', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--device', help='cpu or cuda', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--repeats', help='Timed repeats per phase (median)', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--template', help='Mesh template (default: the bundled head model for the small presets)', metavar='PATH')
@click.option('--threads', help='CPU threads (default: all)', type=int, default=None)
@click.option('--compile', 'which', help='Also time the phases with these networks through torch.compile', type=click.Choice(loss_lib.COMPILE_CHOICES), default='none', show_default=True)
@click.option('--compile-backend', 'compile_backend', help='The torch.compile backend of --compile',
              type=click.Choice(compiled.BACKENDS), default=None, show_default=compiled.DEFAULT_BACKEND)
@click.option('--geometry-in-loader', is_flag=True, help="Also time the phases given the meshes' geometry made beforehand (Next3D)")
@click.option('--profile', 'profiled', help='Also profile one run of this phase (eager)', type=click.Choice(['none', 'Gmain', 'Greg', 'Dmain', 'Dreg']), default='none', show_default=True)
@click.option('--outdir', help='Where to write the result', default=RESULTS_DIR, show_default='benchmarks/results')
def main(cfg, batch, device, repeats, template, threads, which, compile_backend, geometry_in_loader, profiled, outdir):
    """Benchmark training steps of a preset."""
    if which != 'none' and geometry_in_loader:
        raise click.UsageError('--compile and --geometry-in-loader each add a column against eager: time them in separate runs')
    if compile_backend is not None and which == 'none':
        raise click.UsageError('--compile-backend applies to --compile=D, G or all only')
    compile_backend = compile_backend or compiled.DEFAULT_BACKEND
    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    host_memory.keep_freed_memory()         # as training_loop does
    if template is None:
        template = configs.default_template(cfg)
    load_before = load_average()
    G = configs.make_generator(cfg, template_obj=template).train().requires_grad_(False).to(device)
    D = configs.make_discriminator(cfg).train().requires_grad_(False).to(device)
    n_params = (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters()))
    losses = [loss_lib.Next3DLoss(device, G, D, r1_gamma=1.0, gpc_reg_prob=0.5, neural_rendering_resolution_initial=G.neural_rendering_resolution)]
    if which != 'none':
        losses.append(loss_lib.Next3DLoss(device, G, D, r1_gamma=1.0, gpc_reg_prob=0.5, neural_rendering_resolution_initial=G.neural_rendering_resolution))
        losses[1].compile_networks(which, compile_backend)
    adam = dict(lr=0.0025, betas=[0, 0.99], eps=1e-8)
    g_main, g_reg, d_main, d_reg = setup_phases(G, D, adam, adam, 4, 16)
    inputs = make_inputs(G, batch, template, device)
    geometries = None
    if geometry_in_loader:
        if not hasattr(G, 'mesh_geometry'):
            raise click.UsageError(f'--geometry-in-loader: the {cfg} generator takes no mesh geometry (a Next3D preset does)')
        with torch.no_grad():
            geometry = G.mesh_geometry(inputs[2])
        losses.append(losses[0])
        geometries = [None, geometry]
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    rows = []
    for phase, interval in ((g_main, 1), (g_reg, 4), (d_main, 1), (d_reg, 16)):
        time_phase(losses, phase.name, phase.module, phase.opt, inputs, G.z_dim, device, 1, geometries)      # warm-up (compiles)
        secs = time_phase(losses, phase.name, phase.module, phase.opt, inputs, G.z_dim, device, repeats, geometries)
        rows.append((phase.name, interval, secs))
    peak_gib = peak_memory_gib(device)              # before the profiler adds its own
    phases = {p.name: p for p in (g_main, g_reg, d_main, d_reg)}
    profile_lines = [] if profiled == 'none' else profile_phase(losses[0], phases[profiled], inputs, G.z_dim, device)
    steps = [sum(secs[i] / interval for _, interval, secs in rows) for i in range(len(losses))]
    step = steps[0]
    sec_per_kimg = step / batch * 1000
    load_after = load_average()
    commit = git_commit()
    name = device_name(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f'# Training step benchmark: {cfg}, batch {batch}, {name}',
        '',
        f'- date: {now:%Y-%m-%d %H:%M} UTC',
        f'- torch: {torch.__version__}; git commit: {commit}',
        f'- G {n_params[0]:,} parameters, D {n_params[1]:,}; output {G.img_resolution}, raw {G.neural_rendering_resolution}',
        f'- median of {repeats} timed runs per phase after one warm-up; total {time.time() - start:.0f} s',
        f'- system load average (1 min) before / after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs',
        '',
    ]
    if len(losses) == 1:
        lines += ['| phase | every N steps | seconds |', '|---|---|---|'] + [f'| {n} | {i} | {s[0]:.3f} |' for n, i, s in rows]
    else:
        columns = ('rasterizing in the step', 'geometry given') if geometry_in_loader else ('eager', f'--compile={which}' + (
            f' --compile-backend={compile_backend}' if compile_backend != compiled.DEFAULT_BACKEND else ''))
        lines += [f'| phase | every N steps | {columns[0]} seconds | {columns[1]} seconds | ratio |', '|---|---|---|---|---|']
        lines += [f'| {n} | {i} | {s[0]:.3f} | {s[1]:.3f} | {s[1] / s[0]:.3f} |' for n, i, s in rows]
        lines += [f'| step (phases at their intervals) | | {steps[0]:.3f} | {steps[1]:.3f} | {steps[1] / steps[0]:.3f} |', '']
        parts = [('D', losses[1].D_forward), ('G.synthesis', losses[1].synthesis_forward), ('G.sample_mixed', losses[1].sample_mixed_forward)]
        parts = [(name, f) for name, f in parts if isinstance(f, compiled.Compiled)]
        lines += [f'- {name}: compiled in {f.compile_seconds:.0f} s wall ({len(f.checked)} input signatures, each checked against eager)'
                  if f.failed is None else f'- {name}: not compiled, eager: {f.failed}' for name, f in parts]
    lines += [
        '',
        f'**{step:.3f} s per step, {sec_per_kimg:.1f} s/kimg (eager), peak memory {peak_gib:.2f} GiB** '
        f'({"GPU allocated" if device.type == "cuda" else "process RSS"})',
        '',
    ] + profile_lines
    text = '\n'.join(lines)
    print(text)
    suffix = (('' if which == 'none' else f'-compile-{which}') + ('' if compile_backend == compiled.DEFAULT_BACKEND else f'-{compile_backend}') + ('-geometry-in-loader' if geometry_in_loader else '')
              + ('' if profiled == 'none' else f'-profile-{profiled}'))
    write_result(outdir, f'train_step-{cfg}{suffix}-{device.type}-{now:%Y-%m-%d}.md', text)


if __name__ == '__main__':
    main()
