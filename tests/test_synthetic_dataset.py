"""The synthetic dataset generator: layout, labels, meshes, determinism, driving folders."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_preprocessing.synthetic import make_dataset, scene
from training import coords
from training.mesh import obj_io


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _read_all(root):
    return {f: open(os.path.join(root, f), 'rb').read() for f in _files(root)}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synth'))
    make_dataset.make_training_set(root, count=4, resolution=32, seed=3, workers=1)
    return root


def test_layout_is_exact(tiny):
    stems = [f'00000/img{i:08d}' for i in range(4)]
    expected = sorted(['images32x32/dataset.json'] + [f'images32x32/{s}.png' for s in stems]
                      + [f'meshes32x32/{s}.obj' for s in stems] + [f'lms32x32/{s}.txt' for s in stems])
    assert _files(tiny) == expected


def test_labels_are_ffhq_like_cameras(tiny):
    with open(os.path.join(tiny, 'images32x32', 'dataset.json')) as f:
        labels = json.load(f)['labels']
    assert [name for name, _ in labels] == [f'00000/img{i:08d}.png' for i in range(4)]
    pivot = torch.tensor(coords.CAMERA_PIVOT)
    for _, label in labels:
        c = torch.tensor(label, dtype=torch.float64)
        assert c.shape == (25,) and torch.isfinite(c).all()
        cam2world, intr = coords.split_label(c[None])
        torch.testing.assert_close(intr[0], coords.intrinsics().double(), atol=1e-6, rtol=0)
        rot, origin = cam2world[0, :3, :3], cam2world[0, :3, 3]
        torch.testing.assert_close(rot.T @ rot, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
        assert abs(float(torch.det(rot)) - 1) < 1e-5
        assert abs(float((origin - pivot).norm()) - coords.CAMERA_RADIUS) < 1e-4
        forward = rot[:, 2]
        torch.testing.assert_close(forward, (pivot - origin) / (pivot - origin).norm(), atol=1e-5, rtol=0)
        assert float(rot[1, 1]) < -0.5                           # the image's down axis is roughly world -y
        assert cam2world[0, 3].tolist() == [0, 0, 0, 1]


def test_meshes_landmarks_and_images(tiny):
    topo = scene.load_topology()
    for i in range(4):
        v = obj_io.read_obj_vertices(os.path.join(tiny, 'meshes32x32', f'00000/img{i:08d}.obj'),
                                     expected_count=topo.num_vertices)
        lms = obj_io.read_landmarks(os.path.join(tiny, 'lms32x32', f'00000/img{i:08d}.txt'))
        assert v.shape == (topo.num_vertices, 3) and lms.shape == (68, 3)
        # Landmarks lie on the written (canonical) mesh: recompute them from the vertices.
        again = topo.flame.landmarks(torch.from_numpy(v)[None].float())[0].numpy()
        np.testing.assert_allclose(lms, again, atol=2e-6)
        with Image.open(os.path.join(tiny, 'images32x32', f'00000/img{i:08d}.png')) as img:
            assert img.size == (32, 32) and img.mode == 'RGB'
            arr = np.asarray(img)
        assert arr.std() > 5                                     # not a blank image


def test_meshes_are_canonical_and_head_is_in_frame(tiny):
    # The head pose lives in the camera: the mesh's mouth is in front (+z) of its ears, and
    # the head's landmarks project inside the image with the stored label.
    with open(os.path.join(tiny, 'images32x32', 'dataset.json')) as f:
        labels = json.load(f)['labels']
    from training.mesh.rasterize import project_perspective
    for i, (_, label) in enumerate(labels):
        lms = torch.from_numpy(obj_io.read_landmarks(os.path.join(tiny, 'lms32x32', f'00000/img{i:08d}.txt')))
        assert lms[30, 2] > lms[0, 2] + 0.03 and lms[30, 2] > lms[16, 2] + 0.03        # nose tip vs jaw ends
        ndc = project_perspective(coords.mesh_to_world(lms)[None], torch.tensor([label]))[0]
        assert (ndc[:, :2].abs() < 1).all()


def test_same_seed_same_bytes_any_worker_count(tiny, tmp_path):
    make_dataset.make_training_set(str(tmp_path / 'a'), count=4, resolution=32, seed=3, workers=2)
    assert _read_all(str(tmp_path / 'a')) == _read_all(tiny)
    make_dataset.make_training_set(str(tmp_path / 'b'), count=4, resolution=32, seed=4, workers=1)
    other = _read_all(str(tmp_path / 'b'))
    assert other.keys() == _read_all(tiny).keys()
    assert all(other[k] != v for k, v in _read_all(tiny).items())


def test_dataset_loader_reads_it(tiny):
    from training.dataset import MeshImageDataset
    ds = MeshImageDataset(tiny)
    assert len(ds) == 4 and ds.resolution == 32
    img, label, v = ds[2]
    assert img.shape == (3, 32, 32) and label.shape == (25,) and v.shape == (scene.load_topology().num_vertices + 68, 3)


def test_expression_labels_describe_each_image(tmp_path):
    # --expression_labels: dataset_exp.json holds each image's expression coefficients and
    # jaw axis-angle; the loader appends them to the camera label (D's label). The jaw
    # value is that of the written mesh: its inner-lip opening (landmarks 62, 66) is
    # ~96 mm per radian with the bundled head model, plus a few mm from the expression.
    from training.dataset import MeshImageDataset
    root = str(tmp_path / 'exp')
    make_dataset.make_training_set(root, count=8, resolution=16, seed=3, workers=1, expression_labels=True)
    with open(os.path.join(root, 'images16x16', 'dataset_exp.json')) as f:
        exp = json.load(f)['labels']
    with open(os.path.join(root, 'images16x16', 'dataset.json')) as f:
        assert [name for name, _ in exp] == [name for name, _ in json.load(f)['labels']]
    n_exp = scene.load_topology().flame.n_exp
    jaws = []
    for name, values in exp:
        assert len(values) == n_exp + 3 and values[-2:] == [0.0, 0.0]
        lms = obj_io.read_landmarks(os.path.join(root, 'lms16x16', name.replace('.png', '.txt')))
        opening = np.linalg.norm(lms[62] - lms[66])
        assert abs(opening - 0.0963 * values[n_exp]) < 0.005, (name, opening, values[n_exp])
        jaws.append(values[n_exp])
    assert max(jaws) > 0.2 and min(jaws) == 0
    ds = MeshImageDataset(root)
    assert ds.label_dim == 25 + n_exp + 3
    np.testing.assert_allclose(ds.get_label(6)[25:], np.float32(exp[6][1]))


def test_driving_folder(tmp_path):
    from training.driving import read_driving_folder
    root = str(tmp_path / 'drive')
    make_dataset.make_driving_video(root, num_frames=3, resolution=32, seed=1)
    frames = read_driving_folder(root)
    assert [f.frame_id for f in frames] == ['frame00000', 'frame00001', 'frame00002']
    assert _files(root) == sorted(['dataset.json'] + [f'frame{i:05d}{e}' for i in range(3) for e in ('.png', '.obj', '_kpt2d.txt')])
    verts = [obj_io.read_obj_vertices(f.obj_path, expected_count=scene.load_topology().num_vertices) for f in frames]
    assert 0 < np.abs(verts[1] - verts[0]).max() < 0.03          # moving, smoothly (talking jaw: ~1-2 cm per frame)
    assert all(np.isfinite(f.label).all() for f in frames)


@pytest.mark.parametrize('args, message', [
    (['--driving', '--count', '5'], '--count applies to a training set'),
    (['--driving', '--workers', '1'], '--workers applies to a training set'),
    (['--num_frames', '5'], '--num_frames applies to --driving only'),
    (['--driving', '--expression_labels'], '--expression_labels applies to a training set'),
])
def test_cli_refuses_options_of_the_other_mode(tmp_path, args, message):
    from click.testing import CliRunner
    result = CliRunner().invoke(make_dataset.main, ['--outdir', str(tmp_path / 'o'), '--resolution', '32', *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / 'o').exists()


def test_driving_motion_is_smooth_and_blinks():
    g = torch.Generator().manual_seed(0)
    m = make_dataset.driving_motion(300, g)
    assert m['yaw'].diff().abs().max() < 0.03 and m['pitch'].diff().abs().max() < 0.03   # radians per frame, 30 fps
    assert m['jaw'].diff().abs().max() < 0.15                    # syllables at ~3 Hz
    assert (m['jaw'] > 0.1).any() and (m['jaw'] < 0.01).any()    # talking: opens and closes
    assert (m['blink'] > 0.9).sum() >= 2 and (m['blink'] < 0.1).float().mean() > 0.8
    assert abs(float(m['yaw'].mean()) - math.pi / 2) < 0.3


@pytest.mark.parametrize('seed', range(6))
def test_a_one_second_driving_clip_opens_the_mouth_wide(seed):
    # The demo's driving folder is short: its jaw must open wide (speech-like) within it.
    jaw = make_dataset.driving_motion(24, torch.Generator().manual_seed(seed))['jaw']
    assert 0.95 * make_dataset.JAW_MAX <= jaw.max() <= make_dataset.JAW_MAX
    assert jaw.diff().abs().max() < 0.14                         # radians per frame at 30 fps
    between = jaw[1:-1][(jaw[1:-1] < jaw[:-2]) & (jaw[1:-1] <= jaw[2:])]
    assert len(between) >= 1 and between.min() < 0.03           # it closes between syllables


def test_bundled_driving_folder_talks():
    # Inner-lip opening (landmarks 62 and 66) of data/driving: closed in some frames, wide
    # open (jaw ~0.3 rad: ~29 mm with the bundled head model) in others.
    from training.driving import read_driving_folder
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'driving')
    frames = read_driving_folder(root)
    opening = [np.linalg.norm(np.diff(obj_io.read_landmarks(f.lms_path)[[62, 66]], axis=0)) for f in frames]
    assert 24 <= len(frames) <= 48
    assert max(opening) > 0.025 and min(opening) < 0.005
