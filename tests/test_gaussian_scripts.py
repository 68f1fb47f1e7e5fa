"""The Gaussian generator through the project's scripts: train.py --cfg=tiny64-gaussian,
gen_samples (images, .mrc density, .ply point cloud), gen_videos and reenact_avatar."""

import json
import os
import subprocess
import sys

import mrcfile
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import gen_samples
import gen_videos
import legacy
import reenact_avatar
from tests import train_helpers as th
from tests.test_gen_scripts import _driving_folder
from torch_utils import persistence
from training import configs
from training.video import read_video_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def gaussian_network(tmp_path_factory):
    torch.manual_seed(0)
    G = configs.make_generator('tiny64-gaussian').eval()
    path = tmp_path_factory.mktemp('net') / 'network-snapshot-000000.pkl'
    persistence.save_checkpoint(str(path), dict(G=G, G_ema=G, D=None, training_set_kwargs={}))
    return str(path)


def invoke(command, args):
    return CliRunner().invoke(command, args, catch_exceptions=True)


def _read_point_cloud(path):
    data = open(path, 'rb').read()
    head, body = data.split(b'end_header\n', 1)
    lines = head.decode().splitlines()
    count = int([line for line in lines if line.startswith('element vertex')][0].split()[-1])
    assert lines[1] == 'format binary_little_endian 1.0' and 'element face' not in head.decode()
    records = np.frombuffer(body, dtype=[('xyz', '<f4', (3,)), ('rgb', 'u1', (3,))])
    assert len(records) == count
    return records


def test_gen_samples_images_density_and_point_cloud(gaussian_network, tmp_path):
    result = invoke(gen_samples.generate_images, ['--network', gaussian_network, '--seeds', '0', '--outdir', str(tmp_path),
                                                  '--shapes', 'true', '--shape-res', '24'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    image = np.asarray(PIL.Image.open(tmp_path / 'seed0000.png'))
    assert image.shape == (64, 3 * 64, 3) and image.std() > 0
    with mrcfile.open(str(tmp_path / 'seed0000.mrc')) as mrc:
        volume = mrc.data.copy()
    assert volume.shape == (24, 24, 24) and (volume[:2] == -1000).all()
    inner = volume[3:-3, 3:-3, 3:-3]
    assert inner.min() >= 0 and inner.max() > 0.5                     # Gaussians' density: non-negative, the head dense
    result = invoke(gen_samples.generate_images, ['--network', gaussian_network, '--seeds', '0', '--outdir', str(tmp_path),
                                                  '--shapes', 'true', '--shape-format', '.ply'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'Gaussian centres' in result.output
    cloud = _read_point_cloud(tmp_path / 'seed0000.ply')
    G = persistence.load_checkpoint(gaussian_network)['G_ema']
    assert 0.9 * 32 * 32 < len(cloud) <= G.rasterizer.num_gaussians
    assert np.abs(cloud['xyz']).max() < 0.5                           # the head inside the box
    assert cloud['rgb'].std() > 0
    result = invoke(gen_samples.generate_images, ['--network', gaussian_network, '--seeds', '0', '--outdir', str(tmp_path),
                                                  '--shapes', 'true', '--shape-format', '.ply', '--shape-level', '3'])
    assert result.exit_code == 2 and "--shape-level does not apply to a Gaussian generator's .ply" in result.output


def test_gen_videos_and_reenact(gaussian_network, tmp_path):
    result = invoke(gen_videos.generate_videos, ['--network', gaussian_network, '--seeds', '3', '--w-frames', '2', '--outdir',
                                                 str(tmp_path), '--interpolate', 'false', '--image_mode', 'image_depth'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    frames = read_video_frames(str(tmp_path / '3_image_depth.mp4'))
    assert len(frames) == 2 and frames[0].shape == (64, 64, 3)
    drive = _driving_folder(tmp_path / 'drive', n=2)
    result = invoke(reenact_avatar.reenact, ['--drive_root', str(drive), '--network', gaussian_network, '--seeds', '0',
                                             '--grid', '2x1', '--outdir', str(tmp_path), '--fname', 'r.mp4'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    frames = read_video_frames(str(tmp_path / 'r.mp4'))
    assert len(frames) == 2 and frames[0].shape == (64, 2 * 64, 3)


def test_train_py_gaussian_end_to_end_and_resume(tmp_path):
    data = th.make_dataset(str(tmp_path / 'data'), count=4, resolution=64, template=configs.BUNDLED_TEMPLATE)
    out = str(tmp_path / 'runs')
    common = ['--outdir', out, '--cfg', 'tiny64-gaussian', '--data', data, '--gpus', '1', '--batch', '2', '--gamma', '1',
              '--tick', '0.002', '--snap', '1', '--workers', '0', '--grid', '1x1', '--metrics', 'none', '--density_reg_every', '2']
    run = lambda *extra: subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *common, *extra], cwd=ROOT,
                                        capture_output=True, text=True, timeout=900)
    proc = run('--kimg', '0.002')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = os.path.join(out, os.listdir(out)[0])
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['G_kwargs']['cfg'] == 'tiny64-gaussian' and options['G_reg_interval'] == 2
    snapshot = os.path.join(run_dir, 'network-snapshot-000000.002.pkl')
    snap = legacy.load_network_pkl(snapshot)
    assert type(snap.G_ema).__name__ == 'GaussianGenerator' and snap.G_ema.topology_loaded
    for name in ('fakes000000.002.png', 'fakes000000.002_depth.png', 'reals.png'):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    proc = run('--kimg', '0.004', '--resume', snapshot)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = legacy.load_network_pkl(os.path.join(out, sorted(os.listdir(out))[-1], 'network-snapshot-000000.004.pkl'))
    assert resumed.resume_state.cur_nimg == 4


def test_train_py_dry_run_and_rendering_resolution(tmp_path):
    """Gaussian presets render at the output resolution (no super-resolution: a factor of 1 is
    fine); other resolutions need a super-resolution factor."""
    import train
    data = th.make_dataset(str(tmp_path / 'data'), count=2, resolution=64, template=configs.BUNDLED_TEMPLATE)
    args = ['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64-gaussian', '--data', data, '--gpus', '1', '--batch', '2',
            '--gamma', '1', '--metrics', 'none', '--dry-run']
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    G = configs.make_generator('tiny64-gaussian', device='meta')
    assert f'Generator parameters:    {sum(p.numel() for p in G.parameters()):,}' in result.output
    assert '"neural_rendering_resolution_initial": 64' in result.output
    result = CliRunner().invoke(train.main, args + ['--neural_rendering_resolution_initial', '48'])
    assert result.exit_code != 0 and 'no super-resolution module for 48 -> 64' in result.output
    result = CliRunner().invoke(train.main, args + ['--model_version', 'eg3d'])
    assert result.exit_code != 0 and '--cfg=tiny64-gaussian has no eg3d variant' in result.output
