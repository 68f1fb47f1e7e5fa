"""The Gaussian generator through the project's scripts: train.py --cfg=tiny64-gaussian,
gen_samples (images, .mrc density, .ply point cloud), gen_videos, reenact_avatar, inversion
(invert.py, training/inversion.py) and calc_metrics.py."""

import json
import math
import os
import subprocess
import sys

import mrcfile
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import calc_metrics
import gen_samples
import gen_videos
import invert
import legacy
import reenact_avatar
from dataset_preprocessing.synthetic import make_dataset
from tests import train_helpers as th
from tests.test_gen_scripts import _driving_folder
from tests.test_metrics import StandInDetector
from torch_utils import persistence
from training import configs
from training import inversion
from training.generation import orbit_label, read_mesh_condition
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


# ----------------------------------------------------------------------------------------------
# Inversion (one-shot avatar)

def test_inversion_recovers_an_image_of_the_gaussian_generator(gaussian_network):
    """The Gaussian G's own image from a known w, side camera: 10 steps of w bring the PSNR from 14.7 dB
    (the mean w) to 19.7 dB (20 steps: 22.7; another w, seed 11: 15.5 -> 22.4); 6 steps of PTI then
    reach 21.3 dB; G itself is unchanged."""
    G = persistence.load_checkpoint(gaussian_network)['G_ema'].eval().requires_grad_(False)
    v = read_mesh_condition()
    c = orbit_label(G, math.pi / 2 + 0.2, math.pi / 2 - 0.1)
    z = torch.from_numpy(np.random.RandomState(5).randn(1, G.z_dim)).float()
    with torch.no_grad():
        image = G.synthesis(G.mapping(z, c), c, v, noise_mode='const')['image']
    targets = inversion.Targets(image, c, v, ['generated'])
    w_mean, _ = inversion.w_statistics(G, c)
    before = {k: t.clone() for k, t in G.state_dict().items()}
    ws, losses = inversion.project(G, targets, num_steps=10, seed=0)
    assert ws.shape == (1, G.num_ws, G.w_dim) and (ws == ws[:, :1]).all()
    G_tuned, pti_losses = inversion.pivotal_tune(G, ws, targets, num_steps=6, seed=0)
    with torch.no_grad():
        start = inversion.psnr(inversion.render(G, w_mean[:, None].expand(1, G.num_ws, -1), targets), image)
        found = inversion.psnr(inversion.render(G, ws, targets), image)
        tuned = inversion.psnr(inversion.render(G_tuned, ws, targets), image)
    assert start < 17 and found > start + 3.5, (start, found)
    assert losses[-1] < 0.5 * losses[0]
    assert tuned > found + 0.5 and pti_losses[-1] < pti_losses[0], (found, tuned)
    assert all(torch.equal(before[k], t) for k, t in G.state_dict().items())


def test_invert_py_with_a_gaussian_network_and_the_avatar_in_gen_samples(gaussian_network, tmp_path):
    """invert.py on a Gaussian snapshot writes an avatar that is a Gaussian generator with its latent;
    gen_samples renders it (projected.png) and writes the tuned Gaussians' centres for that latent
    and the neutral mesh (.ply)."""
    photo = tmp_path / 'photo'
    make_dataset.make_training_set(str(photo), count=1, resolution=64, seed=3, workers=1)
    out = tmp_path / 'avatar'
    result = invoke(invert.invert, ['--network', gaussian_network, '--target', str(photo), '--outdir', str(out),
                                    '--w-steps', '3', '--pti-steps', '2', '--perceptual', 'none', '--device', 'cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    record = json.loads((out / 'inversion.json').read_text())
    assert 5 < record['psnr_w_db'] < 40 and record['pti_steps'] == 2
    data = legacy.load_network_pkl(str(out / 'avatar.pkl'))
    G = data.G_ema
    assert type(G).__name__ == 'GaussianGenerator' and G.topology_loaded
    assert data.projected_w.shape == (1, G.num_ws, G.w_dim)
    with np.load(out / 'projected_w.npz') as f:
        assert np.array_equal(f['w'], data.projected_w.numpy())

    result = invoke(gen_samples.generate_images, ['--network', str(out / 'avatar.pkl'), '--outdir', str(tmp_path / 's'),
                                                  '--shapes', 'true', '--shape-format', '.ply'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert sorted(os.listdir(tmp_path / 's')) == ['projected.ply', 'projected.png']
    image = np.asarray(PIL.Image.open(tmp_path / 's' / 'projected.png'))
    assert image.shape == (64, 3 * 64, 3) and image.std() > 0
    cloud = _read_point_cloud(tmp_path / 's' / 'projected.ply')
    expected = G.point_cloud(data.projected_w, read_mesh_condition())
    np.testing.assert_allclose(cloud['xyz'], expected['points'].numpy(), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Metrics

@pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')     # the detector format is TorchScript
def test_calc_metrics_on_a_gaussian_snapshot(tmp_path):
    """mesh_depth_err sees the Gaussians' geometry: untrained Gaussians sit near their anchors on the
    mesh (0.039 world units measured here); the same G with every Gaussian pushed 0.05 world units out
    along its face normal (the offset map's normal channel + 5, x offset_gain 0.01) is farther from
    it (0.070). fid_tiny (with a stand-in detector) and the control metrics run; an
    untrained G makes no face that dlib finds: NaN, with 0 faces counted."""
    data = th.make_dataset(str(tmp_path / 'data'), count=4, resolution=64, template=configs.BUNDLED_TEMPLATE)
    detector = str(tmp_path / 'detector.pt')
    torch.jit.script(StandInDetector()).save(detector)
    torch.manual_seed(0)
    G = configs.make_generator('tiny64-gaussian').eval()
    errors = {}
    for name, shift in (('anchored', 0.0), ('pushed', 5.0)):
        run = tmp_path / name
        run.mkdir()
        (run / 'training_options.json').write_text('{}')              # a run folder: results go to metric-*.jsonl
        with torch.no_grad():
            G.backbone.synthesis.b32.torgb.bias[2] += shift          # channel 2: offset along the normal
        snapshot = str(run / 'network-snapshot-000000.pkl')
        persistence.save_checkpoint(snapshot, dict(G=G, G_ema=G, D=None, training_set_kwargs={}))
        metrics = 'mesh_depth_err_tiny,fid_tiny,lmk_tiny' if name == 'anchored' else 'mesh_depth_err_tiny'
        result = invoke(calc_metrics.main, ['--network', snapshot, '--data', data, '--metrics', metrics, '--detector', detector])
        assert result.exit_code == 0, result.output + repr(result.exception)
        errors[name] = json.loads((run / 'metric-mesh_depth_err_tiny.jsonl').read_text())['results']['mesh_depth_err_tiny']
    assert 0 < errors['anchored'] < 0.1 and errors['pushed'] > errors['anchored'] + 0.02, errors
    fid = json.loads((tmp_path / 'anchored' / 'metric-fid_tiny.jsonl').read_text())['results']['fid_tiny']
    assert np.isfinite(fid) and fid > 0
    lmk = json.loads((tmp_path / 'anchored' / 'metric-lmk_tiny.jsonl').read_text())['results']
    assert set(lmk) == {'lmk_tiny', 'lmk_tiny_68', 'lmk_tiny_faces'}
    assert lmk['lmk_tiny_faces'] == 0 and math.isnan(lmk['lmk_tiny'])
