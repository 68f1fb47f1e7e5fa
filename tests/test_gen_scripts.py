"""gen_samples.py, gen_videos.py and reenact_avatar.py end to end on a tiny model."""

import json
import shutil

import mrcfile
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import gen_samples
import gen_videos
import reenact_avatar
from torch_utils import persistence
from training import coords
from training.configs import make_generator
from training.driving import DEFAULT_LMS, DEFAULT_OBJ
from training.mesh.obj_io import read_obj_vertices, write_obj
from training.video import read_video_frames


@pytest.fixture(scope='module')
def tiny_network(tmp_path_factory):
    torch.manual_seed(0)
    G = make_generator('tiny64').eval()
    path = tmp_path_factory.mktemp('net') / 'network-snapshot-000000.pkl'
    persistence.save_checkpoint(str(path), dict(G=G, G_ema=G, D=None, training_set_kwargs={}))
    return str(path)


def invoke(command, args):
    result = CliRunner().invoke(command, args, catch_exceptions=True)
    return result


def test_gen_samples_images_and_mrc(tiny_network, tmp_path):
    result = invoke(gen_samples.generate_images, ['--network', tiny_network, '--seeds', '0,2', '--outdir', str(tmp_path),
                                                  '--shapes', 'true', '--shape-res', '16', '--trunc', '0.7'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for seed in (0, 2):
        image = np.asarray(PIL.Image.open(tmp_path / f'seed{seed:04d}.png'))
        assert image.shape == (64, 3 * 64, 3) and image.dtype == np.uint8
        assert image.std() > 0
        with mrcfile.open(str(tmp_path / f'seed{seed:04d}.mrc')) as mrc:
            assert mrc.data.shape == (16, 16, 16) and mrc.data.dtype == np.float32
            assert (mrc.data[:1] == -1000).all() and np.isfinite(mrc.data).all()
    assert not (tmp_path / 'seed0001.png').exists()
    # The three views differ (the camera moves), the seeds differ.
    image = np.asarray(PIL.Image.open(tmp_path / 'seed0000.png')).astype(float)
    assert np.abs(image[:, :64] - image[:, 128:]).mean() > 0.5
    assert np.abs(image - np.asarray(PIL.Image.open(tmp_path / 'seed0002.png'))).mean() > 0.5


@pytest.mark.parametrize('shape_format', ['.ply', '.obj'])
def test_gen_samples_surfaces(tiny_network, tmp_path, monkeypatch, shape_format):
    trimesh = pytest.importorskip('trimesh')

    def sphere_density(G, ws, v):
        # An untrained network's density need not cross level 10: use a known sphere (r = 0.3).
        return lambda points: 10 + 20 * (0.3 - points.norm(dim=-1, keepdim=True)) / 0.3

    monkeypatch.setattr(gen_samples, 'density_function', sphere_density)
    result = invoke(gen_samples.generate_images, ['--network', tiny_network, '--seeds', '1', '--outdir', str(tmp_path),
                                                  '--shapes', 'true', '--shape-res', '32', '--shape-format', shape_format])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "seed0001" + shape_format + ": level 10 (auto: EG3D's; density maximum" in result.output
    mesh = trimesh.load(str(tmp_path / f'seed0001{shape_format}'))
    assert mesh.is_watertight and len(mesh.faces) > 100 and mesh.volume > 0
    assert abs(np.linalg.norm(mesh.vertices, axis=1).mean() - 0.3) < 0.01


def test_gen_samples_bad_inputs(tiny_network, tmp_path):
    result = invoke(gen_samples.generate_images, ['--network', str(tmp_path / 'missing.pkl'), '--outdir', str(tmp_path)])
    assert result.exit_code == 1 and 'missing.pkl' in result.output
    bad = tmp_path / 'bad.obj'
    write_obj(str(bad), read_obj_vertices(DEFAULT_OBJ)[:100])
    result = invoke(gen_samples.generate_images, ['--network', tiny_network, '--outdir', str(tmp_path), '--seeds', '0',
                                                  '--obj_path', str(bad), '--lms_path', DEFAULT_LMS])
    assert result.exit_code == 1 and 'bad.obj' in result.output and 'vertices' in result.output
    result = invoke(gen_samples.generate_images, ['--network', tiny_network, '--outdir', str(tmp_path), '--seeds', '0',
                                                  '--obj_path', DEFAULT_OBJ, '--lms_path', str(tmp_path / 'nolms.txt')])
    assert result.exit_code == 2 and 'nolms.txt' in result.output         # --lms_path must exist: a usage error


def test_gen_videos_frame_counts(tiny_network, tmp_path):
    result = invoke(gen_videos.generate_videos, ['--network', tiny_network, '--seeds', '0-1', '--grid', '2x1',
                                                 '--w-frames', '2', '--num-keyframes', '2', '--outdir', str(tmp_path),
                                                 '--sample_mult', '0.5'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    frames = read_video_frames(str(tmp_path / 'interpolation.mp4'))
    assert len(frames) == 4 and frames[0].shape == (64, 128, 3)
    result = invoke(gen_videos.generate_videos, ['--network', tiny_network, '--seeds', '3', '--w-frames', '3', '--outdir',
                                                 str(tmp_path), '--interpolate', 'false', '--image_mode', 'image_depth', '--nrr', '16'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    frames = read_video_frames(str(tmp_path / '3_image_depth.mp4'))
    assert len(frames) == 3 and frames[0].shape == (16, 16, 3)    # depth at the neural rendering resolution


def _driving_folder(root, n=3):
    root.mkdir()
    labels = []
    for i in range(n):
        PIL.Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(root / f'{i:03d}.png')
        shutil.copy(DEFAULT_OBJ, root / f'{i:03d}.obj')
        shutil.copy(DEFAULT_LMS, root / f'{i:03d}_kpt2d.txt')
        c = coords.make_label(coords.cam2world_look_at(torch.tensor([np.pi / 2 + 0.2 * i]), torch.tensor([np.pi / 2])))
        labels.append([f'{i:03d}.png', c[0].tolist()])
    (root / 'dataset.json').write_text(json.dumps({'labels': labels}))
    return root


def test_reenact_rows_and_frames(tiny_network, tmp_path):
    drive = _driving_folder(tmp_path / 'drive')
    result = invoke(reenact_avatar.reenact, ['--drive_root', str(drive), '--network', tiny_network, '--seeds', '0-1',
                                             '--grid', '3x1', '--outdir', str(tmp_path), '--fname', 'r.mp4'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    frames = read_video_frames(str(tmp_path / 'r.mp4'))
    assert len(frames) == 3 and frames[0].shape == (64, 3 * 64, 3)
    # The first tile of each row is the driving frame (constant 0, 60, 120 grey).
    for i, frame in enumerate(frames):
        assert abs(frame[8:56, 8:56].astype(float).mean() - 60 * i) < 6
    result = invoke(reenact_avatar.reenact, ['--drive_root', str(drive), '--network', tiny_network, '--num_frames', '1',
                                             '--fixed_camera', 'true', '--lms_cond', 'false', '--outdir', str(tmp_path), '--fname', 'one.mp4'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert len(read_video_frames(str(tmp_path / 'one.mp4'))) == 1


def test_landmarks_from_the_bundled_head_match_the_landmark_file():
    from training.generation import bundled_landmarks
    verts = torch.from_numpy(read_obj_vertices(DEFAULT_OBJ))[None]
    from training.mesh.obj_io import read_landmarks
    np.testing.assert_allclose(bundled_landmarks(verts)[0].numpy(), read_landmarks(DEFAULT_LMS), atol=1e-4)


def test_reenact_bad_inputs(tiny_network, tmp_path):
    drive = _driving_folder(tmp_path / 'drive', n=2)
    (drive / 'dataset.json').unlink()
    result = invoke(reenact_avatar.reenact, ['--drive_root', str(drive), '--network', tiny_network, '--outdir', str(tmp_path)])
    assert result.exit_code == 1 and 'dataset.json' in result.output
    drive2 = _driving_folder(tmp_path / 'drive2', n=2)
    write_obj(str(drive2 / '001.obj'), np.zeros((10, 3)))
    result = invoke(reenact_avatar.reenact, ['--drive_root', str(drive2), '--network', tiny_network, '--outdir', str(tmp_path)])
    assert result.exit_code == 1 and '001.obj' in result.output and 'vertices' in result.output


@pytest.mark.parametrize('command, extra, message', [
    ('samples', ['--shape-res', '32'], '--shape-res applies with --shapes=true only'),
    ('samples', ['--shape-format', '.ply'], '--shape-format applies with --shapes=true only'),
    ('samples', ['--shape-level', '5'], '--shape-level applies with --shapes=true only'),
    ('samples', ['--lms_path', DEFAULT_LMS, '--lms_cond', 'false'], '--lms_path is not read with --lms_cond=false'),
    ('videos', ['--interpolate', 'false', '--grid', '2x1'], '--grid applies with --interpolate=true only'),
    ('videos', ['--interpolate', 'false', '--num-keyframes', '2'], '--num-keyframes applies with --interpolate=true only'),
    ('videos', ['--lms_path', DEFAULT_LMS, '--lms_cond', 'false'], '--lms_path is not read with --lms_cond=false'),
])
def test_options_that_would_be_ignored_are_refused(tiny_network, tmp_path, command, extra, message):
    cmd = gen_samples.generate_images if command == 'samples' else gen_videos.generate_videos
    result = invoke(cmd, ['--network', tiny_network, '--seeds', '0', '--outdir', str(tmp_path / 'out'), *extra])
    assert result.exit_code == 2 and message in result.output, result.output + repr(result.exception)
    assert not (tmp_path / 'out').exists()          # refused before anything is written


def test_mesh_options_are_refused_for_eg3d(tmp_path):
    G = make_generator('tiny64-eg3d').eval()
    path = tmp_path / 'eg3d.pkl'
    persistence.save_checkpoint(str(path), dict(G=G, G_ema=G, D=None, training_set_kwargs={}))
    result = invoke(gen_samples.generate_images, ['--network', str(path), '--seeds', '0', '--outdir', str(tmp_path / 'out'),
                                                  '--obj_path', DEFAULT_OBJ])
    assert result.exit_code == 2 and 'not mesh-driven' in result.output, result.output + repr(result.exception)
    assert not (tmp_path / 'out').exists()


def test_reenact_refuses_smooth_with_fixed_camera(tiny_network, tmp_path):
    drive = _driving_folder(tmp_path / 'drive', n=1)
    result = invoke(reenact_avatar.reenact, ['--drive_root', str(drive), '--network', tiny_network, '--outdir', str(tmp_path),
                                             '--fixed_camera', 'true', '--smooth', '3'])
    assert result.exit_code == 2 and '--smooth' in result.output and 'fixed_camera' in result.output, result.output


def test_same_seed_same_pixels(tiny_network, tmp_path):
    # The renderer's random depth sampling is seeded from the seed: two runs give identical
    # images and video frames, whatever torch's global generator does.
    for run in ('a', 'b'):
        torch.manual_seed(ord(run))
        result = invoke(gen_samples.generate_images, ['--network', tiny_network, '--seeds', '5', '--outdir', str(tmp_path / run)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        result = invoke(gen_videos.generate_videos, ['--network', tiny_network, '--seeds', '5', '--w-frames', '2', '--interpolate',
                                                     'false', '--image_mode', 'image_raw', '--outdir', str(tmp_path / run)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        drive = _driving_folder(tmp_path / f'drive_{run}', n=2)
        result = invoke(reenact_avatar.reenact, ['--drive_root', str(drive), '--network', tiny_network, '--seeds', '5',
                                                 '--outdir', str(tmp_path / run), '--fname', 'r.mp4'])
        assert result.exit_code == 0, result.output + repr(result.exception)
    read = lambda run: np.asarray(PIL.Image.open(tmp_path / run / 'seed0005.png'))
    assert np.array_equal(read('a'), read('b'))
    for video in ('5_image_raw.mp4', 'r.mp4'):
        frames_a, frames_b = (read_video_frames(str(tmp_path / run / video)) for run in ('a', 'b'))
        assert len(frames_a) == len(frames_b) > 0
        assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b)), video


def test_reenact_drives_each_frame_with_its_own_mesh(tiny_network, tmp_path):
    """A second frame with another mesh changes the avatars of that frame only (a loop that kept frame 0's mesh passes
    every other reenactment test). Two folders, same cameras and seeds: frame 0 identical, frame 1 differs."""
    changed = _driving_folder(tmp_path / 'changed', n=2)
    same = _driving_folder(tmp_path / 'same', n=2)
    v = read_obj_vertices(DEFAULT_OBJ)
    write_obj(str(changed / '001.obj'), v * np.array([1.15, 1.0, 1.0], np.float32))     # a wider head in frame 1
    for folder in (changed, same):
        result = invoke(reenact_avatar.reenact, ['--drive_root', str(folder), '--network', tiny_network, '--seeds', '3',
                                                 '--fixed_camera', 'true', '--outdir', str(tmp_path / folder.name), '--fname', 'r.mp4'])
        assert result.exit_code == 0, result.output + repr(result.exception)
    a = [f[:, 64:].astype(float) for f in read_video_frames(str(tmp_path / 'changed' / 'r.mp4'))]
    b = [f[:, 64:].astype(float) for f in read_video_frames(str(tmp_path / 'same' / 'r.mp4'))]
    assert np.abs(a[0] - b[0]).max() <= 2                 # same mesh, camera and sampling: the same avatar (codec noise)
    assert np.abs(a[1] - b[1]).mean() > 3 * max(np.abs(a[0] - b[0]).mean(), 0.5)
