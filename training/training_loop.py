"""The training loop: phases, EMA, ticks, snapshots, grids, metrics, resume, signals.

One call of `training_loop(...)` per process. Every schedule (blur, pose-conditioning
swap, neural rendering resolution, EMA ramp-up, lazy regularization) is a function of
the image counter, and the counter, the step index, the optimizers, G_ema and the
augmentation probability are saved in every snapshot, so `--resume` of a snapshot
continues the run where it stopped. The torch random generator is re-seeded at every
step from (seed, rank, step) and the data streams are replayed from the step index, so a
resumed run draws the same batches and noise as an uninterrupted one.

Snapshots (`network-snapshot-KKKKKK.KKK.pkl`, kimg with three decimals: unique and in
training order, see training/run_folder.py) hold G, D, G_ema, training_set_kwargs and
`resume_state`, which includes ADA's sign statistics since its last update of p;
SIGINT/SIGTERM make every rank stop after the current step, rank 0 writes such a
snapshot, and the loop returns normally. Rank 0 locks the run folder while it trains.
"""

import copy
import filecmp
import io
import itertools
import json
import os
import resource
import signal
import time

import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import host_memory
from torch_utils import misc
from torch_utils import persistence
from torch_utils import training_stats
from training import builders
from training import distributed
from training import resume as resume_lib
from training import run_folder
from training.loss import Next3DLoss
from training.mesh import rasterize
from training.mesh.texture_planes import TexturePlaneRasterizer, ViewGeometry
from training.network_pickle import load_network_pkl

# ----------------------------------------------------------------------------------------
# Data

class ConditionView(torch.utils.data.Dataset):
    """The dataset's (label, v) pairs without decoding images: what G is conditioned on.
    Given (draw, index) keys (DrawNumbers), the draw's number comes last: (label, v, draw)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        draw, idx = key if isinstance(key, tuple) else (None, key)
        item = self.dataset.get_label(idx), self.dataset.get_vertices(idx)
        return item if draw is None else (*item, draw)


class DrawNumbers(torch.utils.data.Sampler):
    """The indices of `sampler`, each with the number of the batch (the draw) it falls in,
    counted from `first`: (draw, index)."""

    def __init__(self, sampler, first: int, batch: int):
        super().__init__()
        self.sampler, self.first, self.batch = sampler, int(first), int(batch)

    def __iter__(self):
        for i, idx in enumerate(self.sampler):
            yield self.first + i // self.batch, idx


class GeometryCollate:
    """The conditions loader's collate_fn (its items (label, v, draw), see DrawNumbers) that
    adds G.rasterizer.geometry of the batch's meshes, made in the loader's workers: a batch is
    (label, v, ViewGeometry), or (label, v) for a draw that no phase uses (run_step draws for
    every phase, due or not, and R1 runs no G). See docs/TRAINING.md (mesh geometry in the
    loader's workers).

    phases: (interval, runs G) of each phase in run_step's order: draw k serves phase
    k % len(phases) at step k // len(phases).
    """

    def __init__(self, rasterizer: torch.nn.Module, num_vertices: int, phases):
        self.rasterizer = copy.deepcopy(rasterizer).cpu().eval().requires_grad_(False)
        self.rasterizer.__dict__.pop('_mirrored_faces', None)         # a cache on the original's device
        self.rasterizer.__dict__.pop('_mirrored_faces_key', None)
        self.num_vertices = int(num_vertices)
        self.phases = tuple((int(interval), bool(runs_G)) for interval, runs_G in phases)

    def __call__(self, items):
        c, v = torch.utils.data.default_collate([item[:2] for item in items])
        draw = items[0][2]
        interval, runs_G = self.phases[draw % len(self.phases)]
        if not runs_G or (draw // len(self.phases)) % interval != 0:
            return c, v
        with torch.no_grad():
            geometry = self.rasterizer.geometry(v[:, :self.num_vertices])
        return c, v, geometry


def geometry_collate(G, device: torch.device, num_workers: int, phases):
    """(GeometryCollate for the conditions loader of these phases (setup_phases), or None
    with a line saying why not).

    Only Next3D's generator rasterizes meshes; the loader needs workers; a NEXT3D_RASTERIZER
    backend on a GPU keeps the rasterization in the step (the workers have only ours)."""
    if not isinstance(getattr(G, 'rasterizer', None), TexturePlaneRasterizer):
        return None, '--geometry-in-loader: this generator rasterizes no mesh; nothing to move'
    if num_workers == 0:
        return None, '--geometry-in-loader: the data loader has no workers (--workers=0); the meshes are rasterized in the step'
    backend = dnnlib.util.optional_backend(rasterize.BACKEND_ENV, rasterize.BACKENDS, 'mesh rasterizer', device.type == 'cuda')
    if backend != 'pytorch':
        return None, (f'--geometry-in-loader: {rasterize.BACKEND_ENV}={backend} rasterizes in the step '
                      "(the loader's workers have only our CPU rasterizer)")
    return GeometryCollate(G.rasterizer, G.num_vertices, [(p.interval, p.name != 'Dreg') for p in phases]), None


class SkipSampler(torch.utils.data.Sampler):
    """An InfiniteSampler whose first `skip` indices are dropped (replays a stream on resume)."""

    def __init__(self, sampler, skip: int):
        super().__init__()
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def _ignore_stop_signals(_worker_id):
    # Ctrl-C reaches the whole process group: workers must leave SIGINT/SIGTERM to the
    # main process, which writes the resume snapshot, instead of dying and crashing it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, rank, num_gpus, seed, batch, skip_batches, data_loader_kwargs, numbered: bool = False):
    """An endless iterator of batches of `dataset` for this rank, resumed after `skip_batches`;
    numbered: the dataset gets (draw, index) keys (DrawNumbers, the first draw skip_batches)."""
    sampler = misc.InfiniteSampler(dataset, rank=rank, num_replicas=num_gpus, seed=seed)
    sampler = SkipSampler(sampler, skip_batches * batch)
    if numbered:
        sampler = DrawNumbers(sampler, skip_batches, batch)
    kwargs = dict(data_loader_kwargs)
    if kwargs.get('num_workers', 0) > 0:
        kwargs.setdefault('worker_init_fn', _ignore_stop_signals)
    return iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch, **kwargs))


CPU_GRID_MAX = (8, 4)      # auto grid on a CPU: EG3D's up to 32 x 32 images would take longer than the training ticks


def setup_snapshot_grid(training_set, random_seed: int, grid_size=None, on_cpu: bool = False):
    """Grid shape (gw, gh) and the items shown: (images uint8 (N,3,R,R), labels (N,L), v (N,V+68,3)).

    grid_size None: EG3D's choice (about 7680 x 4320 pixels, 7..32 x 4..32 images), at most
    CPU_GRID_MAX on a CPU.
    """
    if grid_size is None:
        gw = int(np.clip(7680 // training_set.resolution, 7, 32))
        gh = int(np.clip(4320 // training_set.resolution, 4, 32))
        if on_cpu:
            gw, gh = min(gw, CPU_GRID_MAX[0]), min(gh, CPU_GRID_MAX[1])
    else:
        gw, gh = grid_size
    rnd = np.random.RandomState(random_seed)
    idx = rnd.permutation(len(training_set))
    idx = np.resize(idx, gw * gh)     # repeats when the dataset is smaller than the grid
    items = [training_set[int(i)] for i in idx]
    images, labels, verts = (np.stack(x) for x in zip(*items))
    return (gw, gh), images, labels, verts


def encode_image_grid(img: np.ndarray, drange, grid_size) -> bytes:
    """(N, C, H, W) array with values in `drange` -> PNG bytes of a gw x gh grid (C = 1 or 3)."""
    lo, hi = drange
    img = (np.asarray(img, dtype=np.float32) - lo) * (255 / max(hi - lo, 1e-8))
    img = np.rint(img).clip(0, 255).astype(np.uint8)
    gw, gh = grid_size
    n, c, h, w = img.shape
    img = img.reshape(gh, gw, c, h, w).transpose(0, 3, 1, 4, 2).reshape(gh * h, gw * w, c)
    buffer = io.BytesIO()
    PIL.Image.fromarray(img[:, :, 0] if c == 1 else img, 'L' if c == 1 else 'RGB').save(buffer, format='png')
    return buffer.getvalue()


def save_image_grid(img, path: str, drange, grid_size):
    persistence.atomic_write_bytes(path, encode_image_grid(img, drange, grid_size))


# ----------------------------------------------------------------------------------------
# Networks and optimizers

def build_networks(G_kwargs: dict, D_kwargs: dict, device: torch.device):
    """(G, D, G_ema) on `device`, G and D trainable, G_ema a frozen copy of G."""
    G = builders.build('network', G_kwargs).train().requires_grad_(False).to(device)
    D = builders.build('network', D_kwargs).train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()
    return G, D, G_ema


def setup_phases(G, D, G_opt_kwargs: dict, D_opt_kwargs: dict, G_reg_interval, D_reg_interval):
    """EG3D's phases: (name, module, opt, interval) with the lazy-regularization correction.

    A regularization every I steps is weighted by I (its `gain`); the main phase's Adam
    gets lr x r and betas^r, r = I / (I + 1), so the pair moves like one step.
    """
    phases = []
    for name, module, opt_kwargs, reg_interval in [('G', G, G_opt_kwargs, G_reg_interval), ('D', D, D_opt_kwargs, D_reg_interval)]:
        params = [p for p in module.parameters()]
        opt_kwargs = dict(opt_kwargs)
        class_name = opt_kwargs.pop('class_name', 'torch.optim.Adam')
        if class_name == 'torch.optim.Adam' and 'fused' not in opt_kwargs and 'foreach' not in opt_kwargs and \
                all(p.device.type in ('cpu', 'cuda') and p.dtype.is_floating_point for p in params):
            # One fused update for all tensors: 3.6 instead of 13.3 ms per G step of small128 on
            # one CPU core (352 tensors), and on a GPU no per-tensor host work and scalar reads.
            # The same update up to float rounding (2e-7 here).
            opt_kwargs['fused'] = True
        if 'betas' in opt_kwargs:
            opt_kwargs['betas'] = tuple(float(beta) for beta in opt_kwargs['betas'])
        if reg_interval is None:
            opt = builders.build('optimizer', dict(opt_kwargs, class_name=class_name), params)
            phases.append(dnnlib.EasyDict(name=name + 'both', module=module, opt=opt, interval=1))
        else:
            ratio = reg_interval / (reg_interval + 1)
            opt_kwargs['lr'] = opt_kwargs['lr'] * ratio
            opt_kwargs['betas'] = tuple(beta ** ratio for beta in opt_kwargs['betas'])
            opt = builders.build('optimizer', dict(opt_kwargs, class_name=class_name), params)
            phases.append(dnnlib.EasyDict(name=name + 'main', module=module, opt=opt, interval=1))
            phases.append(dnnlib.EasyDict(name=name + 'reg', module=module, opt=opt, interval=reg_interval))
    return phases


def optimizer_states(phases) -> dict:
    """{'G': state_dict, 'D': state_dict} (the reg phase shares its main phase's optimizer)."""
    return {phase.name[0]: phase.opt.state_dict() for phase in phases}


@torch.no_grad()
def update_ema(G, G_ema, cur_nimg: int, batch_size: int, ema_kimg: float, ema_rampup):
    """G_ema <- lerp towards G with half-life ema_kimg (ramped up as cur_nimg x ema_rampup)."""
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    ema_beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
    # Multi-tensor ops: a few kernel launches on a GPU instead of two per tensor, the same
    # values as p.lerp(p_ema, ema_beta) tensor by tensor.
    params, params_ema = list(G.parameters()), list(G_ema.parameters())
    if params:
        torch._foreach_copy_(params_ema, torch._foreach_lerp(params, params_ema, ema_beta))
    buffers, buffers_ema = list(G.buffers()), list(G_ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers_ema, buffers)


def set_rendering_resolution(G, resolution: int):
    """Set G's neural rendering resolution (the generator keeps it in its checkpointed extra state).

    Not through the constructor arguments: they also choose the super-resolution layout.
    """
    G.neural_rendering_resolution = int(resolution)


# ----------------------------------------------------------------------------------------
# One step

def step_seed(random_seed: int, rank: int, batch_idx: int) -> int:
    return int(np.random.SeedSequence([random_seed, rank, batch_idx]).generate_state(1)[0])


def run_step(loss, phases, real_iter, gen_iter, device, batch_gpu, z_dim, cur_nimg):
    """One training step: every due phase accumulates its gradients over rounds of batch_gpu and steps."""
    # Copies to the device without waiting for it (the loader pins its batches); a blocking
    # copy would wait for all the GPU work queued before it.
    to_device = lambda t: t.to(device, non_blocking=True)
    real_img, real_c, real_v = next(real_iter)
    real_img = (to_device(real_img).to(torch.float32) / 127.5 - 1).split(batch_gpu)
    real_c, real_v = to_device(real_c).split(batch_gpu), to_device(real_v).split(batch_gpu)
    for phase in phases:
        batch = next(gen_iter)              # drawn for every phase, due or not: keeps streams aligned
        gen_c, gen_v = batch[:2]
        gen_z = torch.randn([len(gen_c), z_dim], device=device).split(batch_gpu)
        if phase.batch_idx % phase.interval != 0:
            continue
        gen_c, gen_v = to_device(gen_c).split(batch_gpu), to_device(gen_v).split(batch_gpu)
        gen_geometry = [None] * len(gen_c)
        if len(batch) == 3:                 # (label, v, ViewGeometry) from GeometryCollate
            parts = [to_device(t).split(batch_gpu) for t in batch[2]]
            gen_geometry = [ViewGeometry(*round_parts) for round_parts in zip(*parts)]
        phase.opt.zero_grad(set_to_none=True)
        phase.module.requires_grad_(True)
        for r_img, r_c, r_v, g_z, g_c, g_v, g_geo in zip(real_img, real_c, real_v, gen_z, gen_c, gen_v, gen_geometry):
            loss.accumulate_gradients(phase=phase.name, real_img=r_img, real_c=r_c, real_v=r_v, gen_z=g_z, gen_c=g_c, gen_v=g_v,
                                      gain=phase.interval, cur_nimg=cur_nimg, gen_geometry=g_geo)
        phase.module.requires_grad_(False)
        distributed.all_reduce_grads([p for p in phase.module.parameters()])
        phase.opt.step()


# ----------------------------------------------------------------------------------------
# Reporting and files

def memory_report(device) -> tuple:
    """(cpu resident GiB, peak gpu GiB or 0)."""
    rss = None
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0.0
    return rss / 2**30, gpu


def format_status(state, tick_time, tick_nimg, maintenance, device, augment_p) -> str:
    cpu_gib, gpu_gib = memory_report(device)
    fields = [
        f"tick {training_stats.report0('Progress/tick', state.cur_tick):<5d}",
        f"kimg {training_stats.report0('Progress/kimg', state.cur_nimg / 1e3):<8.3f}",
        f"time {format_time(training_stats.report0('Timing/total_sec', time.time() - state.start_time)):<12s}",
        f"sec/tick {training_stats.report0('Timing/sec_per_tick', tick_time):<7.1f}",
        f"sec/kimg {training_stats.report0('Timing/sec_per_kimg', tick_time / max(tick_nimg, 1) * 1e3):<7.2f}",
        f"maintenance {training_stats.report0('Timing/maintenance_sec', maintenance):<6.1f}",
        f"cpumem {training_stats.report0('Resources/cpu_mem_gb', cpu_gib):<6.2f}",
        f"gpumem {training_stats.report0('Resources/peak_gpu_mem_gb', gpu_gib):<6.2f}",
    ]
    if augment_p is not None:
        fields.append(f"augment {training_stats.report0('Progress/augment', augment_p):.3f}")
    return ' '.join(fields)


def format_time(seconds: float) -> str:
    s = int(np.rint(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'


class StatsWriter:
    """Appends one JSON line per tick to stats.jsonl and, when installed, writes TensorBoard scalars."""

    def __init__(self, run_dir: str):
        self.jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(run_dir)
        except ImportError:
            pass

    def write(self, stats: dict, cur_nimg: int, timestamp: float):
        self.jsonl.write(json.dumps(dict(stats, timestamp=timestamp)) + '\n')
        self.jsonl.flush()
        if self.tensorboard is not None:
            for name, value in stats.items():
                self.tensorboard.add_scalar(name, value['mean'], global_step=int(cur_nimg / 1e3), walltime=timestamp)
            self.tensorboard.flush()

    def close(self):
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


@torch.no_grad()
def generate_grid(G_ema, grid_z, grid_c, grid_v, batch_gpu):
    """(image, image_raw, image_depth) numpy arrays for the grid's latents, labels and meshes."""
    outs = [G_ema(z=z, c=c[:, :max(int(G_ema.c_dim), 25)], v=v, noise_mode='const')
            for z, c, v in zip(grid_z.split(batch_gpu), grid_c.split(batch_gpu), grid_v.split(batch_gpu))]
    return [torch.cat([o[key] for o in outs]).cpu().numpy() for key in ('image', 'image_raw', 'image_depth')]


def save_fake_grids(run_dir, G_ema, grid, grid_size, batch_gpu, tag: str):
    """fakes{tag}.png, fakes{tag}_raw.png (upsampled to the image size), fakes{tag}_depth.png."""
    image, raw, depth = generate_grid(G_ema, *grid, batch_gpu)
    size = image.shape[-1]
    raw = torch.nn.functional.interpolate(torch.from_numpy(raw), size=(size, size), mode='nearest').numpy()
    save_image_grid(image, os.path.join(run_dir, f'fakes{tag}.png'), drange=[-1, 1], grid_size=grid_size)
    save_image_grid(raw, os.path.join(run_dir, f'fakes{tag}_raw.png'), drange=[-1, 1], grid_size=grid_size)
    # Near is bright: show -depth over its range.
    save_image_grid(-depth, os.path.join(run_dir, f'fakes{tag}_depth.png'), drange=[-depth.max(), -depth.min()], grid_size=grid_size)


def save_snapshot(run_dir, G, D, G_ema, training_set_kwargs, state, phases, augment_pipe, log=print) -> str:
    """network-snapshot-KKKKKK.KKK.pkl with the networks and everything a resume needs (atomic).

    A different file under that name (not written by this run) is kept: the snapshot then
    gets the first free name network-snapshot-KKKKKK.KKK-N.pkl.
    """
    resume_state = dict(
        cur_nimg=int(state.cur_nimg), cur_tick=int(state.cur_tick) + 1, batch_idx=int(state.batch_idx),   # the tick to run next
        optimizers=optimizer_states(phases),
        augment_p=None if augment_pipe is None else float(augment_pipe.p.item()),
        ada_signs=None if state.get('ada_signs') is None else state.ada_signs.tolist(),
        ada_kimg=float(state.ada_kimg),
        random_seed=int(state.random_seed), batch_size=int(state.batch_size),
    )
    data = dict(G=G, D=D, G_ema=G_ema, training_set_kwargs=dict(training_set_kwargs), resume_state=resume_state)
    if augment_pipe is not None:
        data['augment_pipe'] = augment_pipe
    name = run_folder.snapshot_name(state.cur_nimg)
    path = os.path.join(run_dir, name)
    taken = 0
    while os.path.exists(path):
        taken += 1
        path = os.path.join(run_dir, name[:-len('.pkl')] + f'-{taken}.pkl')
    persistence.save_checkpoint(path, data)
    if taken:
        first = os.path.join(run_dir, name)
        if filecmp.cmp(first, path, shallow=False):      # this very state was saved already
            os.remove(path)
            return first
        log(f'Note: {name} exists with other content (not written by this run): kept it, saved this snapshot as {os.path.basename(path)}')
    return path


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:      # not the main thread: signals are not ours to handle
                pass
        return self

    def _handle(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------
# The loop

def training_loop(
    run_dir: str = '.',                 # output folder (rank 0 writes)
    training_set_kwargs: dict = None,   # MeshImageDataset(**kwargs)
    data_loader_kwargs: dict = None,    # DataLoader kwargs (num_workers, pin_memory, ...)
    G_kwargs: dict = None,              # generator: class_name + kwargs
    D_kwargs: dict = None,              # discriminator: class_name + kwargs
    G_opt_kwargs: dict = None,          # G optimizer: class_name, lr, betas, eps
    D_opt_kwargs: dict = None,          # D optimizer
    augment_kwargs: dict = None,        # augmentation pipe: class_name + kwargs, or None
    loss_kwargs: dict = None,           # Next3DLoss kwargs
    metrics: list = (),                 # metric names evaluated at each snapshot
    metrics_detector: str = None,       # Inception detector file of the metrics (None = metrics/detector.py's default)
    random_seed: int = 0,               # global seed
    num_gpus: int = 1,                  # number of processes
    rank: int = 0,                      # this process
    device: str = 'cpu',                # this process's device
    batch_size: int = 4,                # total batch over all processes
    batch_gpu: int = 4,                 # batch per process and round
    ema_kimg: float = 10.0,             # EMA half-life (kimg)
    ema_rampup: float = 0.05,           # EMA ramp-up factor, None = off
    G_reg_interval: int = 4,            # lazy density regularization interval, None = with the main loss
    D_reg_interval: int = 16,           # lazy R1 interval, None = with the main loss
    augment_p: float = 0.0,             # initial augmentation probability
    ada_target: float = None,           # ADA target of sign(D(real)), None = fixed p
    ada_interval: int = 4,              # steps between p updates
    ada_kimg: float = 500.0,            # kimg for p to move from 0 to 1
    total_kimg: float = 25000,          # length of training
    kimg_per_tick: float = 4,           # progress interval
    image_snapshot_ticks: int = 50,     # image grids every N ticks (None = never)
    network_snapshot_ticks: int = 50,   # snapshots and metrics every N ticks (None = never)
    grid_size: tuple = None,            # (columns, rows) of the image grids; None = EG3D's choice
    resume_pkl: str = None,             # snapshot to continue, or weights to start from
    resume_kwargs: dict = None,         # dict(resume_blur=bool): keep the fade-ins when starting from other weights
    cudnn_benchmark: bool = True,       # torch.backends.cudnn.benchmark
    compile: str = 'none',              # torch.compile D and/or G (synthesis, density query) in the phases: 'none', 'D', 'G', 'all'
    compile_backend: str = None,        # its backend, one of torch_utils.compiled.BACKENDS (None: inductor)
    geometry_in_loader: bool = False,   # Next3D: rasterize the meshes in the loader's workers (GeometryCollate)
    progress_fn=None,                   # callback(cur_nimg, total_nimg)
):
    """Train. Returns EasyDict(snapshot_pkl (rank 0's last snapshot or None), G, D, G_ema, cur_nimg, batch_idx, stopped)."""
    device = torch.device(device)
    start_time = time.time()
    torch.manual_seed(step_seed(random_seed, rank, 2**31))     # set-up draws: apart from every step's stream
    np.random.seed(random_seed * num_gpus + rank)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    distributed.set_tf32(False)                                  # full float32, as EG3D (R1 needs exact gradients)
    host_memory.keep_freed_memory()                              # CPU: no page faults for each phase's activations
    log = print if rank == 0 else (lambda *a, **k: None)
    data_loader_kwargs = dict(data_loader_kwargs or {})
    folder_lock = lock_run_folder(run_dir, resume_pkl, log) if rank == 0 else None

    log('Loading training set...')
    training_set = builders.open_dataset(training_set_kwargs)
    log(f'Num images: {len(training_set)}  resolution: {training_set.resolution}  label dim: {training_set.label_dim}'
        f'  vertices: {training_set.num_vertices} + 68 landmarks')

    log('Constructing networks...')
    G, D, G_ema = build_networks(G_kwargs, D_kwargs, device)
    state = dnnlib.EasyDict(cur_nimg=0, cur_tick=0, batch_idx=0, start_time=start_time, random_seed=random_seed, batch_size=batch_size,
                            ada_kimg=ada_kimg)
    resume_state = None
    if resume_pkl is not None:
        resume_state, loss_kwargs, ema_rampup = load_resume(resume_pkl, G, D, G_ema, resume_kwargs, loss_kwargs, ema_rampup, log)
    distributed.broadcast_module(G)
    distributed.broadcast_module(D)
    distributed.broadcast_module(G_ema)

    augment_pipe = None
    if augment_kwargs is not None:
        augment_pipe = builders.build('augment', augment_kwargs).train().requires_grad_(False).to(device)
        augment_pipe.p.copy_(torch.as_tensor(augment_p))
        if ada_target is not None:
            state.ada_collector = training_stats.Collector(regex='Loss/signs/real', keep_previous=False)
            state.ada_signs = torch.zeros(3, dtype=torch.float64)     # [count, sum, sum_sq] since p's last update, all ranks

    loss = Next3DLoss(device=device, G=G, D=D, augment_pipe=augment_pipe, **(loss_kwargs or {}))
    loss.compile_networks(compile, compile_backend, log=log)
    phases = setup_phases(G, D, G_opt_kwargs, D_opt_kwargs, G_reg_interval, D_reg_interval)
    if resume_state is not None:
        restore_training_state(resume_state, state, phases, augment_pipe, log)
        log(f'--kimg={total_kimg:g} is the total length of training, counting the {state.cur_nimg / 1e3:.3f} kimg before the snapshot: '
            f'{max(total_kimg - state.cur_nimg / 1e3, 0):.3f} kimg to go.')

    batch_per_rank = batch_size // num_gpus
    real_iter = make_loader(training_set, rank, num_gpus, random_seed, batch_per_rank, state.batch_idx, data_loader_kwargs)
    collate = None
    if geometry_in_loader:
        collate, why = geometry_collate(G, device, data_loader_kwargs.get('num_workers', 0), phases)
        log(why or "Rasterizing the generator's meshes in the data loader's workers")
    gen_iter = make_loader(ConditionView(training_set), rank, num_gpus, random_seed + 1, batch_per_rank, state.batch_idx * len(phases),
                           data_loader_kwargs if collate is None else dict(data_loader_kwargs, collate_fn=collate), numbered=collate is not None)

    grid = grid_size_used = stats_writer = None
    if rank == 0:
        grid_size_used, grid = setup_grids(run_dir, training_set, G_ema, random_seed, grid_size, batch_gpu, device, fresh=state.cur_nimg == 0)
        stats_writer = StatsWriter(run_dir)
    stats_collector = training_stats.Collector(regex='.*')
    stats_metrics = {}

    log(f'Training for {total_kimg} kimg from kimg {state.cur_nimg / 1e3:.3f}...')
    total_nimg = int(total_kimg * 1000)
    tick_start_nimg, tick_start_time = state.cur_nimg, time.time()
    maintenance = tick_start_time - start_time
    last_snapshot = None
    if progress_fn is not None:
        progress_fn(state.cur_nimg, total_nimg)

    with StopRequest() as stop:
        while True:
            torch.manual_seed(step_seed(random_seed, rank, state.batch_idx))
            schedule = loss.schedule(state.cur_nimg)
            set_rendering_resolution(G, schedule['neural_rendering_resolution'])
            for phase in phases:
                phase.batch_idx = state.batch_idx
            run_step(loss, phases, real_iter, gen_iter, device, batch_gpu, G.z_dim, state.cur_nimg)

            update_ema(G, G_ema, state.cur_nimg, batch_size, ema_kimg, ema_rampup)
            set_rendering_resolution(G_ema, schedule['neural_rendering_resolution'])
            state.cur_nimg += batch_size
            state.batch_idx += 1
            adjust_augment(augment_pipe, state, ada_target, ada_interval, state.ada_kimg, batch_size)

            stopping = distributed.any_rank(stop.signum is not None, device)
            done = state.cur_nimg >= total_nimg or stopping
            if not done and state.cur_tick != 0 and state.cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
                continue

            # --- tick ---------------------------------------------------------------------
            tick_end_time = time.time()
            status = format_status(state, tick_end_time - tick_start_time, state.cur_nimg - tick_start_nimg, maintenance, device,
                                   None if augment_pipe is None else float(augment_pipe.p))
            log(status)
            if progress_fn is not None:
                progress_fn(state.cur_nimg, total_nimg)
            if stopping:
                log(f'Stop requested by signal {stop.signum if stop.signum is not None else "(on another rank)"}: writing a resume snapshot.')

            if rank == 0 and image_snapshot_ticks is not None and (done or state.cur_tick % image_snapshot_ticks == 0):
                save_fake_grids(run_dir, G_ema, grid, grid_size_used, batch_gpu, tag=run_folder.kimg_stamp(state.cur_nimg))

            snapshot_due = network_snapshot_ticks is not None and (done or state.cur_tick % network_snapshot_ticks == 0)
            if snapshot_due:
                for module in (G, D, G_ema):
                    distributed.check_consistency(module, ignore_regex=r'.*\.[^.]+_(avg|ema)')
                if state.get('ada_collector') is not None:
                    collect_ada_signs(state)        # every rank: the snapshot keeps the signs since p's last update
                if rank == 0:
                    last_snapshot = save_snapshot(run_dir, G, D, G_ema, training_set_kwargs, state, phases, augment_pipe, log)
                    log(f'Saved {os.path.basename(last_snapshot)}')
                distributed.barrier()
                if metrics and not stopping:
                    stats_metrics = evaluate_metrics(metrics, G_ema, training_set_kwargs, num_gpus, rank, device, run_dir, last_snapshot, log,
                                                     detector=metrics_detector)

            stats_collector.update()
            if stats_writer is not None:
                stats = stats_collector.as_dict()
                stats.update({f'Metrics/{k}': dict(num=1, mean=v, std=0.0) for k, v in stats_metrics.items()})
                stats_writer.write(stats, state.cur_nimg, time.time())
            stats_metrics = {}

            state.cur_tick += 1
            tick_start_nimg, tick_start_time = state.cur_nimg, time.time()
            maintenance = tick_start_time - tick_end_time
            if done:
                break

    if stats_writer is not None:
        stats_writer.close()
    training_set.close()
    if folder_lock is not None:
        folder_lock.release()
    stopped = stop.signum is not None or stopping
    log('Stopped cleanly.' if stopped else 'Exiting...')
    return dnnlib.EasyDict(snapshot_pkl=last_snapshot, G=G, D=D, G_ema=G_ema, cur_nimg=state.cur_nimg, batch_idx=state.batch_idx,
                           stopped=stopped)


def load_resume(resume_pkl, G, D, G_ema, resume_kwargs, loss_kwargs, ema_rampup, log):
    """Load --resume into the networks -> (resume_state or None, loss_kwargs, ema_rampup) for this run."""
    log(f'Resuming from "{resume_pkl}"')
    resume_data = load_network_pkl(resume_pkl)
    if resume_data.get('import_report'):     # an official pickle: how it was mapped onto our classes
        from training import official_import
        log(official_import.format_report(resume_data.import_report))
    mode, resume_state = resume_lib.restore(resume_data, G, D, G_ema, log=log)
    if mode == 'initialise' and not (resume_kwargs or {}).get('resume_blur', False):
        # A new run from trained weights: as EG3D, no blur or swap fade-in and no EMA ramp-up.
        loss_kwargs = dict(loss_kwargs or {}, blur_init_sigma=0, gpc_reg_fade_kimg=0)
        ema_rampup = None
        log('Blur and pose-conditioning fade-ins and the EMA ramp-up are off (pass --resume_blur=True to keep them).')
    return resume_state, loss_kwargs, ema_rampup


def setup_grids(run_dir, training_set, G_ema, random_seed, grid_size, batch_gpu, device, fresh: bool):
    """reals.png (and fakes_init*.png for a fresh run) -> (grid size, (z, c, v) of the grid)."""
    grid_size, images, labels, verts = setup_snapshot_grid(training_set, random_seed, grid_size, on_cpu=torch.device(device).type == 'cpu')
    save_image_grid(images, os.path.join(run_dir, 'reals.png'), drange=[0, 255], grid_size=grid_size)
    grid_z = torch.randn([len(labels), G_ema.z_dim], generator=torch.Generator().manual_seed(random_seed)).to(device)
    grid = (grid_z, torch.from_numpy(labels).to(device), torch.from_numpy(verts).to(device))
    if fresh:
        save_fake_grids(run_dir, G_ema, grid, grid_size, batch_gpu, tag='_init')
    return grid_size, grid


def collect_ada_signs(state):
    """Add the sign(D(real)) moments reported since the last call, summed over ranks, to state.ada_signs (collective)."""
    state.ada_collector.update()
    state.ada_signs += state.ada_collector.moments('Loss/signs/real')


def adjust_augment(augment_pipe, state, ada_target, ada_interval, ada_kimg, batch_size):
    """ADA heuristic: every ada_interval steps, p += sign(E[sign(D(real))] - target) x batch x interval / (ada_kimg x 1000), in [0, 1]."""
    if augment_pipe is None or ada_target is None or state.batch_idx % ada_interval != 0:
        return
    collect_ada_signs(state)
    count, total = float(state.ada_signs[0]), float(state.ada_signs[1])
    state.ada_signs.zero_()
    if count == 0:
        return
    adjust = np.sign(total / count - ada_target) * (batch_size * ada_interval) / (ada_kimg * 1000)
    augment_pipe.p.copy_((augment_pipe.p + adjust).clamp(0, 1))


def lock_run_folder(run_dir, resume_pkl, log) -> run_folder.RunFolderLock:
    """Rank 0: lock the run folder; remove stale temporary files there and in the resumed snapshot's folder."""
    os.makedirs(run_dir, exist_ok=True)
    lock = run_folder.RunFolderLock(run_dir)        # refuses a folder another run is writing in
    cleaned = [(run_dir, run_folder.remove_stale_temp_files(run_dir, lock))]
    resume_dir = None if resume_pkl is None else os.path.dirname(os.path.abspath(resume_pkl))
    if resume_dir is not None and os.path.isdir(resume_dir) and not os.path.samefile(resume_dir, run_dir):
        cleaned.append((resume_dir, run_folder.remove_stale_temp_files(resume_dir)))
    for folder, removed in cleaned:
        if removed:
            size = sum(n for _, n in removed) / 2**20
            log(f'Removed {len(removed)} temporary files of interrupted writes in {folder} ({size:.1f} MiB): '
                f'{", ".join(n for n, _ in removed)}')
    return lock


# Parameter-group entries a resume leaves as the snapshot has them: the parameters, and how the
# update runs (its state is laid out for that); the rest (learning rate, betas, ...) is this run's.
KEPT_ON_RESUME = ('params', 'fused', 'foreach', 'capturable', 'differentiable')


def restore_training_state(resume_state, state, phases, augment_pipe, log):
    """Counters, optimizers and augmentation probability from a snapshot's resume_state."""
    state.cur_nimg = int(resume_state['cur_nimg'])
    state.cur_tick = int(resume_state['cur_tick'])
    state.batch_idx = int(resume_state['batch_idx'])
    for phase in phases:
        opt_state = resume_state['optimizers'].get(phase.name[0])
        if opt_state is not None and phase.name.endswith(('main', 'both')):
            # Moments and step counts from the snapshot; learning rates and betas from this run's
            # options. How the update runs (fused, foreach, ...) stays the snapshot's: its state
            # is laid out for it (a fused Adam keeps its step counts on the parameters' device),
            # and the continuation stays bit-identical.
            hyper = [{k: v for k, v in g.items() if k not in KEPT_ON_RESUME} for g in phase.opt.param_groups]
            phase.opt.load_state_dict(opt_state)
            for group, h in zip(phase.opt.param_groups, hyper):
                group.update(h)
    if augment_pipe is not None and resume_state.get('augment_p') is not None:
        augment_pipe.p.copy_(torch.as_tensor(resume_state['augment_p']))
    if state.get('ada_signs') is not None and resume_state.get('ada_signs') is not None:
        state.ada_signs.copy_(torch.as_tensor(resume_state['ada_signs'], dtype=torch.float64))
    if resume_state.get('ada_kimg') is not None and float(resume_state['ada_kimg']) != state.ada_kimg:
        # p keeps moving at the speed of the run it continues (older snapshots did not store it).
        log(f"ADA speed of the snapshot: ada_kimg {float(resume_state['ada_kimg']):g} (this run's option: {state.ada_kimg:g})")
        state.ada_kimg = float(resume_state['ada_kimg'])
    if resume_state.get('batch_size') is not None and int(resume_state['batch_size']) != state.batch_size:
        log(f"Note: the snapshot was trained with batch {resume_state['batch_size']}, this run uses {state.batch_size}")
    log(f'Continuing at kimg {state.cur_nimg / 1e3:.3f}, tick {state.cur_tick}, step {state.batch_idx}')


def evaluate_metrics(metrics, G_ema, training_set_kwargs, num_gpus, rank, device, run_dir, snapshot_pkl, log, detector=None) -> dict:
    """Run each metric on G_ema; rank 0 appends metric-<name>.jsonl. Returns {name: value} for the stats."""
    from metrics import metric_main
    values = {}
    for metric in metrics:
        result = metric_main.calc_metric(metric=metric, G=G_ema, dataset_kwargs=training_set_kwargs,
                                         num_gpus=num_gpus, rank=rank, device=device, detector=detector)
        if rank == 0:
            metric_main.report_metric(result, run_dir=run_dir, snapshot_pkl=snapshot_pkl)
            log(metric_main.format_result(result))
        values.update(result.results)
    return values
