"""Shapes, videos, driving folders and argument parsing used by the generation scripts."""

import json

import mrcfile
import numpy as np
import pytest
import torch

import dnnlib
from training import coords, shapes
from training.driving import load_condition, read_driving_folder, smooth_labels
from training.generation import make_grid
from training.mesh.obj_io import write_landmarks, write_obj
from training.video import VideoWriter, read_video_frames


def test_parse_range_and_grid():
    assert dnnlib.parse_range('0-3,7') == [0, 1, 2, 3, 7]
    assert dnnlib.parse_range('5') == [5]
    assert dnnlib.parse_range([1, 2]) == [1, 2]
    with pytest.raises(ValueError):
        dnnlib.parse_range('3-1')
    assert dnnlib.parse_vec2('4x2') == (4, 2) and dnnlib.parse_vec2('3,1') == (3, 1)
    with pytest.raises(ValueError):
        dnnlib.parse_vec2('4x2x1')


def test_density_volume_matches_function_and_index_order():
    # sigma = 100 x + 10 y + z: recover the coordinates from the volume.
    def sigma_fn(points):
        return (points[..., 0] * 100 + points[..., 1] * 10 + points[..., 2])[..., None]
    n = 9
    vol = shapes.sample_density_volume(sigma_fn, n, box_warp=1.0, chunk=50)
    axis = np.linspace(-0.5, 0.5, n)
    i, j, k = 2, 5, 7
    assert vol.shape == (n, n, n) and vol.dtype == np.float32
    assert vol[i, j, k] == pytest.approx(100 * axis[i] + 10 * axis[j] + axis[k], abs=1e-5)


def test_mrc_round_trip_with_eg3d_border(tmp_path):
    vol = np.random.RandomState(0).rand(32, 32, 32).astype(np.float32) * 20
    prepared = shapes.prepare_mrc_volume(vol)
    pad = int(30 * 32 / 256)
    assert pad == 3
    assert (prepared[:pad] == -1000).all() and (prepared[:, :, -pad:] == -1000).all()
    assert prepared[10, 11, 12] == vol[32 - 1 - 10, 11, 12]         # axis 0 flipped
    path = tmp_path / 'shape.mrc'
    shapes.save_mrc(str(path), prepared)
    with mrcfile.open(str(path)) as mrc:
        assert mrc.data.shape == (32, 32, 32) and mrc.data.dtype == np.float32
        np.testing.assert_array_equal(mrc.data, prepared)


def test_ply_of_a_sphere_is_a_valid_closed_mesh(tmp_path):
    trimesh = pytest.importorskip('trimesh')
    n = 40
    g = shapes.grid_coordinates(n).numpy()
    radius = 0.3
    vol = (20 * (radius - np.linalg.norm(g, axis=1)) / radius * 2 + 10).reshape(n, n, n).astype(np.float32)
    verts, faces = shapes.volume_to_mesh(vol, level=10.0)
    path = tmp_path / 'shape.ply'
    shapes.save_ply(str(path), verts, faces)
    mesh = trimesh.load(str(path))
    assert len(mesh.vertices) == len(verts) and len(mesh.faces) == len(faces)
    assert mesh.is_watertight
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(r.mean() - radius) < 0.01
    with pytest.raises(ValueError, match='never crosses'):
        shapes.volume_to_mesh(np.zeros((8, 8, 8), np.float32), level=10.0)


def test_video_frame_count_and_content(tmp_path):
    path = tmp_path / 'v.mp4'
    with VideoWriter(str(path), fps=30) as video:
        for i in range(9):
            video.append(np.full((32, 48, 3), 20 * i, np.uint8))
    frames = read_video_frames(str(path))
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    assert abs(frames[4].astype(float).mean() - 80) < 3
    with pytest.raises(ValueError, match='uint8'):
        with VideoWriter(str(tmp_path / 'bad.mp4')) as video:
            video.append(np.zeros((8, 8, 3), np.float32))
    assert not (tmp_path / 'bad.mp4').exists()                     # nothing left under the final name


def test_make_grid_layout():
    frames = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(6)])
    grid = make_grid(frames, (3, 2))
    assert grid.shape == (4, 9, 3)
    assert grid[0, 3, 0] == 1 and grid[2, 0, 0] == 3 and grid[3, 8, 0] == 5


def _write_driving(root, n=4, vertices=10):
    root.mkdir()
    labels = []
    for i in range(n):
        name = f'{i:04d}.png'
        import PIL.Image
        PIL.Image.fromarray(np.full((16, 16, 3), 10 * i, np.uint8)).save(root / name)
        write_obj(str(root / f'{i:04d}.obj'), np.random.RandomState(i).randn(vertices, 3))
        write_landmarks(str(root / f'{i:04d}_kpt2d.txt'), np.random.RandomState(i).randn(68, 3))
        c = coords.make_label(coords.cam2world_look_at(torch.tensor([np.pi / 2 + 0.1 * i]), torch.tensor([np.pi / 2])))[0]
        labels.append([name, c.tolist()])
    (root / 'dataset.json').write_text(json.dumps({'labels': labels}))


def test_driving_folder_reading_and_errors(tmp_path):
    root = tmp_path / 'drive'
    _write_driving(root)
    frames = read_driving_folder(str(root))
    assert [f.frame_id for f in frames] == ['0000', '0001', '0002', '0003']
    v = load_condition(frames[1].obj_path, frames[1].lms_path, num_vertices=10)
    assert v.shape == (1, 78, 3)
    with pytest.raises(ValueError, match=r'0001\.obj.*expected 12 vertices, found 10'):
        load_condition(frames[1].obj_path, frames[1].lms_path, num_vertices=12)
    (root / '0002_kpt2d.txt').unlink()
    with pytest.raises(FileNotFoundError, match='0002_kpt2d.txt'):
        read_driving_folder(str(root))
    (root / 'dataset.json').unlink()
    with pytest.raises(FileNotFoundError, match='dataset.json'):
        read_driving_folder(str(root))


def test_smooth_labels_handles_ends_and_stays_rotation():
    yaws = np.pi / 2 + np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    labels = coords.make_label(coords.cam2world_look_at(torch.tensor(yaws), torch.full((5,), np.pi / 2))).numpy()
    out = smooth_labels(labels, radius=1)
    assert out.shape == labels.shape
    rot = out[:, :16].reshape(5, 4, 4)[:, :3, :3]
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (5, 3, 3)), atol=1e-5)
    # Middle frame: average of yaws 0.1..0.3 -> camera centre of yaw 0.2 (up to the chord shrinkage)
    np.testing.assert_allclose(out[2, [3, 11]], labels[2, [3, 11]], atol=2e-2)
    # Ends average only the frames that exist
    np.testing.assert_allclose(out[0, 16:], labels[0, 16:])
    np.testing.assert_allclose(out[0, 3], labels[:2, 3].mean(), atol=1e-6)
