"""Head-model fitting on synthetic ground truth: known cameras, shapes, expressions, jaw."""

import math

import numpy as np
import pytest
import torch

from dataset_preprocessing import alignment, fit_flame, landmarks, pose_label
from training import coords
from training.mesh.head_model import load_head_model
from training.mesh.rasterize import project_perspective


@pytest.fixture(scope='module')
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # small problems: the thread pool only costs time
    yield fit_flame.HeadModelAdapter(load_head_model())
    torch.set_num_threads(threads)


def _camera(yaw, pitch, roll):
    """Our orbit camera (radius 2.7 about the pivot, not EG3D's label family) with a roll."""
    cam = coords.cam2world_look_at(torch.tensor([math.pi / 2 + yaw]), torch.tensor([math.pi / 2 + pitch]))
    cam[:, :3, :3] = cam[:, :3, :3] @ coords.euler_to_matrix(torch.tensor([[0.0, 0.0, math.degrees(roll)]]))
    return cam


def _synthetic(model, yaw, pitch, roll, seed, jaw=0.2):
    g = torch.Generator().manual_seed(seed)
    shape, exp = torch.randn(1, model.n_shape, generator=g), 0.5 * torch.randn(1, model.n_exp, generator=g)
    lms = model(shape, exp, torch.tensor([[jaw, 0.0, 0.0]]))[1]
    cam = _camera(yaw, pitch, roll)
    ndc = project_perspective(coords.mesh_to_world(lms), coords.make_label(cam))
    return cam, (ndc[0, :, :2].numpy() + 1) * 256          # 68 points in a 512 image


def test_standard_landmarks_from_head_model(model):
    _, lms = model(torch.zeros(1, model.n_shape), torch.zeros(1, model.n_exp), torch.zeros(1, 3))
    np.testing.assert_allclose(alignment.standard_landmarks_5(lms[0].numpy()), alignment.STANDARD_LANDMARKS_5, atol=0.01)
    std = alignment.STANDARD_LANDMARKS_5
    np.testing.assert_array_equal(std[[1, 0, 2, 4, 3]] * [-1, 1, 1], std)       # mirror symmetric


def test_landmark_path_matches_full_model(model):
    g = torch.Generator().manual_seed(3)
    shape, exp, jaw = torch.randn(2, model.n_shape, generator=g), torch.randn(2, model.n_exp, generator=g), 0.2 * torch.rand(2, 3, generator=g)
    torch.testing.assert_close(model.landmarks(shape, exp, jaw), model(shape, exp, jaw)[1], atol=1e-6, rtol=0)


def test_dynamic_contour_matches_flame_layer(tmp_path):
    """FLAME's DECA-style embedding: contour points chosen by yaw, as FlameModel.landmarks does."""
    import os
    from training.mesh.flame import FlameModel
    from training.mesh.flame_pickle import load_landmark_embedding
    from training.mesh.head_model import default_head_model_dir
    folder = default_head_model_dir()
    emb = load_landmark_embedding(os.path.join(folder, 'landmark_embedding.npy'))
    flame = FlameModel(os.path.join(folder, 'generic_model.pkl'), os.path.join(folder, 'landmark_embedding.npy'))
    rng = np.random.RandomState(0)
    dynamic = {k: emb[k] for k in ('static_lmk_faces_idx', 'static_lmk_bary_coords', 'dynamic_lmk_bary_coords')}
    dynamic['dynamic_lmk_faces_idx'] = rng.randint(0, len(flame.faces), size=emb['dynamic_lmk_faces_idx'].shape)
    np.save(tmp_path / 'emb.npy', dynamic, allow_pickle=True)
    flame = FlameModel(os.path.join(folder, 'generic_model.pkl'), str(tmp_path / 'emb.npy'))
    assert flame.dynamic_contour
    adapter = fit_flame.HeadModelAdapter(flame)
    shape, exp, jaw = torch.randn(3, flame.n_shape), torch.randn(3, flame.n_exp), 0.1 * torch.rand(3, 3)
    yaw = torch.tensor([0.3, -0.2, 0.0])
    verts = flame(shape, exp, jaw_pose=jaw)[0]
    torch.testing.assert_close(adapter.landmarks(shape, exp, jaw, adapter.contour_bins(yaw)), flame.landmarks(verts, yaw), atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter.landmarks(shape, exp, jaw), adapter(shape, exp, jaw)[1], atol=1e-6, rtol=0)
    assert adapter.contour_bins(yaw).tolist() == [40 - 1 + 17, 11, 0]      # -17 deg -> 39 + 17; +11 deg -> 11


def test_projection_matches_rasterizer_convention():
    pts = torch.randn(2, 7, 3) * 0.05
    labels = pose_label.pose_to_label(torch.tensor([[0.1, -0.3, 0.05], [0.0, 0.4, 0.0]]), torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.2, 0.0]]))
    scale = torch.tensor([1.0, 1.1])
    ndc = project_perspective(coords.mesh_to_world(pts) * scale[:, None, None], labels)
    torch.testing.assert_close(fit_flame.project_landmarks(pts, scale, labels, 512.0), (ndc[..., :2] + 1) * 256, atol=1e-3, rtol=0)


@pytest.mark.parametrize('yaw, pitch, roll, seed', [(0.0, 0.0, 0.0, 1), (0.45, 0.1, 0.1, 2), (-0.55, -0.15, -0.1, 3)])
def test_fit_recovers_synthetic_pose_and_jaw(model, yaw, pitch, roll, seed):
    cam, points = _synthetic(model, yaw, pitch, roll, seed)
    box, _, _ = alignment.align_face(alignment.landmarks_68_to_5(points))
    crop_points = box.to_crop(points)
    result = fit_flame.fit_head(model, crop_points[None], 512)
    # Pose: yaw (y), pitch (x), roll (z) of the label's rotation against the true camera's.
    err_deg = np.degrees(np.abs(pose_label.cam2world_to_head_angles(result.labels[0, :16].reshape(4, 4))
                                - pose_label.cam2world_to_head_angles(cam[0].numpy())))
    assert err_deg.max() < 2.0, err_deg
    # Landmarks: the written canonical landmarks, projected with the written label by the
    # rasterizer's projection, land on the crop's points.
    ndc = project_perspective(coords.mesh_to_world(torch.as_tensor(result.landmarks)), torch.as_tensor(result.labels))
    reproj = np.linalg.norm((ndc[0, :, :2].numpy() + 1) * 256 - crop_points, axis=1)
    assert reproj.mean() < 1.0 and result.error_px[0] < 1.0, reproj.mean()
    assert abs(result.jaw_pose[0, 0] - 0.2) < 0.05                     # jaw opening (radians)
    assert np.linalg.norm(result.labels[0, [3, 7, 11]]) == pytest.approx(2.7, rel=1e-5)
    np.testing.assert_allclose(result.labels[0, 16:], [4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1], atol=1e-6)
    assert result.vertices.shape == (1, len(model.flame.v_template), 3) and np.isfinite(result.vertices).all()


def test_five_points_and_mirror(model):
    cam, points = _synthetic(model, 0.3, 0.05, 0.0, 4, jaw=0.0)
    box, _, _ = alignment.align_face(alignment.landmarks_68_to_5(points))
    crop_points = box.to_crop(points)
    # Five points only: rigid pose + scale, coefficients held by their priors.
    five = fit_flame.fit_head(model, alignment.landmarks_68_to_5(crop_points)[None], 512,
                              landmark_matrix=alignment.five_from_68_matrix())
    err = np.degrees(np.abs(pose_label.cam2world_to_head_angles(five.labels[0, :16].reshape(4, 4))
                            - pose_label.cam2world_to_head_angles(cam[0].numpy())))
    assert err.max() < 6.0 and five.error_px[0] < 1.0
    # Mirror: the mirrored crop with the yaw-flipped camera and the same scale fits as well.
    result = fit_flame.fit_head(model, crop_points[None], 512)
    mirrored = landmarks.mirror_landmarks_2d(crop_points, 512)
    flipped = fit_flame.fit_head(model, mirrored[None], 512, fixed_labels=pose_label.mirror_label(torch.as_tensor(result.labels)).numpy(),
                                 fixed_scale=result.scale)
    assert flipped.error_px[0] < 1.0
    np.testing.assert_allclose(flipped.labels, pose_label.mirror_label(torch.as_tensor(result.labels)).numpy())
    assert flipped.angles[0, 1] == pytest.approx(-result.angles[0, 1], abs=1e-5)   # yaw flipped


def test_point_weights_ignore_points(model):
    cam, points = _synthetic(model, 0.2, 0.1, 0.05, 6)
    box, _, _ = alignment.align_face(alignment.landmarks_68_to_5(points))
    crop_points = box.to_crop(points)
    corrupted = crop_points.copy()
    corrupted[:17] += np.random.RandomState(0).normal(0, 40, size=(17, 2))      # a wrong jaw line
    weights = np.ones(68)
    weights[:17] = 0
    result = fit_flame.fit_head(model, corrupted[None], 512, point_weights=weights)
    assert np.linalg.norm(result.projected[0, 17:] - crop_points[17:], axis=1).mean() < 1.0
    err_deg = np.degrees(np.abs(pose_label.cam2world_to_head_angles(result.labels[0, :16].reshape(4, 4))
                                - pose_label.cam2world_to_head_angles(cam[0].numpy())))
    assert err_deg.max() < 3.0, err_deg
    with pytest.raises(ValueError, match='point_weights'):
        fit_flame.fit_head(model, corrupted[None], 512, point_weights=np.ones(5))


def test_video_fit_shares_shape_and_smooths(model):
    """Six frames of one still head with 2 px landmark noise: smoothing steadies the camera."""
    _, points = _synthetic(model, 0.2, 0.05, 0.0, 8)
    box, _, _ = alignment.align_face(alignment.landmarks_68_to_5(points))
    noisy = box.to_crop(points)[None] + np.random.RandomState(0).normal(0, 2.0, size=(6, 68, 2))
    jitter = {}
    for smoothness in (0.0, 5.0):
        result = fit_flame.fit_head(model, noisy, 512, groups=np.zeros(6), smoothness=smoothness, full_iters=60)
        np.testing.assert_array_equal(result.shape, np.repeat(result.shape[:1], 6, axis=0))     # one identity
        jitter[smoothness] = np.degrees(np.abs(np.diff(result.angles, axis=0))).mean()
    assert jitter[5.0] < 0.5 * jitter[0.0], jitter


def test_fit_rejects_bad_input(model):
    with pytest.raises(ValueError, match=r'\(B, K, 2\)'):
        fit_flame.fit_head(model, np.zeros([68, 2]), 512)
    with pytest.raises(ValueError, match='finite'):
        fit_flame.fit_head(model, np.full([1, 68, 2], np.nan), 512)
    with pytest.raises(ValueError, match='landmark_matrix'):
        fit_flame.fit_head(model, np.zeros([1, 5, 2]), 512)


def test_fit_on_synthetic_dataset_ground_truth(model, tmp_path):
    """The synthetic generator's labels and canonical landmarks are the ground truth."""
    from dataset_preprocessing.synthetic import make_dataset       # a project module: an import error must fail, not skip
    from training.mesh.obj_io import read_landmarks
    make_dataset.make_training_set(str(tmp_path), count=4, resolution=64, seed=0, workers=1)
    import json
    labels = json.loads((tmp_path / 'images64x64' / 'dataset.json').read_text())['labels']
    for rel, label in labels:
        c = torch.tensor([label])
        lms = torch.as_tensor(read_landmarks(str(tmp_path / 'lms64x64' / rel.replace('.png', '.txt'))))[None]
        points = (project_perspective(coords.mesh_to_world(lms), c)[0, :, :2].numpy() + 1) * 256
        box, _, _ = alignment.align_face(alignment.landmarks_68_to_5(points))
        result = fit_flame.fit_head(model, box.to_crop(points)[None], 512)
        err_deg = np.degrees(np.abs(pose_label.cam2world_to_head_angles(result.labels[0, :16].reshape(4, 4))
                                    - pose_label.cam2world_to_head_angles(c[0, :16].reshape(4, 4).numpy())))
        assert err_deg.max() < 2.0, (rel, err_deg)
        assert result.error_px[0] < 1.0, (rel, result.error_px)
        # Mouth opening (inner lips 62-66) relative to the eye corners' distance (36-45): the
        # fitted mesh carries the fit's scale (~0.93 here: the generator's cameras orbit the
        # pivot, EG3D's labels the origin), so compare sizes relative to the face.
        opening = lambda p: float(p[62, 1] - p[66, 1]) / float(np.linalg.norm(p[36] - p[45]))
        assert abs(opening(result.landmarks[0]) - opening(lms[0].numpy())) < 0.02, rel
