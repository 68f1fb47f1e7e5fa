"""Exact geometry of the in-the-wild preprocessing: POS, crop boxes, pose -> label, mirror."""

import math

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from dataset_preprocessing import alignment, landmarks, pose_label
from training import coords

FIVE_3D = np.array([[-0.31, 0.29, 0.13], [0.31, 0.29, 0.13], [0.0, -0.05, 0.55],
                    [-0.25, -0.38, 0.22], [0.25, -0.38, 0.22]])


def _rot_y(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def _project_weak(points, s, rot, t):
    """Orthographic projection with y down: u = s (R X)_x + t_x, v = -s (R X)_y + t_y."""
    p = points @ rot.T
    return np.stack([s * p[:, 0], -s * p[:, 1]], axis=1) + t


@pytest.mark.parametrize('yaw', [0.0, 25.0, -40.0])
def test_pos_recovers_similarity(yaw):
    s, t = 123.5, np.array([301.25, 188.0])
    pts = _project_weak(FIVE_3D, s, _rot_y(yaw), t)
    s_fit, t_fit = alignment.fit_scale_translation(pts, FIVE_3D)
    assert s_fit == pytest.approx(s, rel=1e-10)
    np.testing.assert_allclose(t_fit, t, atol=1e-9)


def test_pos_rejects_degenerate():
    with pytest.raises(ValueError, match='coplanar'):
        alignment.fit_scale_translation(np.random.rand(5, 2), FIVE_3D * np.array([1, 1, 0]))
    with pytest.raises(ValueError, match='N >= 4'):
        alignment.fit_scale_translation(np.zeros([3, 2]), FIVE_3D[:3])
    with pytest.raises(ValueError, match='non-finite'):
        alignment.fit_scale_translation(np.full([5, 2], np.nan), FIVE_3D)


def test_crop_boxes_for_known_face():
    s, t = 80.0, np.array([250.0, 200.0])
    box, s_fit, t_fit = alignment.align_face(_project_weak(FIVE_3D, s, np.eye(3), t), FIVE_3D)
    assert s_fit == pytest.approx(80.0)
    np.testing.assert_allclose(box.center, t)
    assert box.side == pytest.approx(700 * 80 / 300)           # 186.67 source pixels
    assert box.size == 512
    np.testing.assert_allclose(box.bounds(), [250 - 93.3333333, 200 - 93.3333333, 250 + 93.3333333, 200 + 93.3333333])
    # A point one alignment unit right of the face centre lands 300 * 512 / 700 pixels right of the crop centre.
    np.testing.assert_allclose(box.to_crop(t + [s, 0]), [256 + 300 * 512 / 700, 256])
    np.testing.assert_allclose(box.to_source(box.to_crop([[10.0, 20.0]])), [[10.0, 20.0]])
    d3 = alignment.deep3d_crop_box(s, t)
    assert d3.side == pytest.approx(224 * 80 / 102) and d3.size == 224
    np.testing.assert_allclose(d3.to_crop(t + [s, -s]), [112 + 102, 112 - 102])


def test_crop_image_places_pixels():
    img = np.zeros([200, 300, 3], np.uint8)
    img[120:124, 60:64] = 255                                # block centred at (62, 122)
    box = alignment.CropBox(center=np.array([50.0, 110.0]), side=100.0, size=50)
    out = np.asarray(alignment.crop_image(Image.fromarray(img), box, resample=Image.BILINEAR)).astype(np.float64)[..., 0]
    yy, xx = np.mgrid[:50, :50] + 0.5
    centroid = np.array([(out * xx).sum(), (out * yy).sum()]) / out.sum()
    np.testing.assert_allclose(centroid, box.to_crop([62.0, 122.0]), atol=0.05)   # (31, 31)
    # Part of the box is outside the image (left of x = 0): padded with black, geometry kept.
    assert out[:, :2].max() == 0


def test_landmarks_68_to_5():
    lm = np.random.rand(68, 3)
    five = alignment.landmarks_68_to_5(lm)
    np.testing.assert_allclose(five[0], (lm[36] + lm[39]) / 2)
    np.testing.assert_allclose(five[1], (lm[42] + lm[45]) / 2)
    np.testing.assert_allclose(five[2:], lm[[30, 48, 54]])
    np.testing.assert_allclose(alignment.five_from_68_matrix() @ lm, five)


def _label(angles_deg, trans):
    a = torch.tensor([angles_deg], dtype=torch.float32).deg2rad()
    return pose_label.pose_to_cam2world(a, torch.tensor([trans], dtype=torch.float32))[0].double().numpy()


def test_pose_to_label_frontal():
    m = _label([0, 0, 0], [0, 0, 0])
    # centre: -(0, 0, -10) * 0.27 + (0, 0.006, 0.161) = (0, 0.006, 2.861), radius -> 2.7
    c = np.array([0, 0.006, 2.861])
    expected = np.eye(4)
    expected[:3, :3] = np.diag([1, -1, -1])
    expected[:3, 3] = c * 2.7 / np.linalg.norm(c)
    np.testing.assert_allclose(m, expected, atol=1e-6)
    lab = pose_label.pose_to_label(torch.zeros(1, 3), torch.zeros(1, 3))[0].numpy()
    np.testing.assert_allclose(lab[16:], [4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1], atol=1e-6)


def test_pose_to_label_yaw90_and_translation():
    m = _label([0, 90, 0], [0, 0, 0])
    # R = Ry(90); camera rotation R^T diag(1, -1, -1); centre -R^T (0, 0, -10) = (-10, 0, 0).
    c = np.array([-2.7, 0.006, 0.161])
    expected = np.eye(4)
    expected[:3, :3] = [[0, 0, 1], [0, -1, 0], [1, 0, 0]]
    expected[:3, 3] = c * 2.7 / np.linalg.norm(c)
    np.testing.assert_allclose(m, expected, atol=1e-6)
    m = _label([0, 0, 0], [1.0, 0, 0])
    c = np.array([-0.27, 0.006, 2.861])                     # -(1, 0, -10) * 0.27 + offset
    np.testing.assert_allclose(m[:3, 3], c * 2.7 / np.linalg.norm(c), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(m[:3, 3]), 2.7, rtol=1e-6)


def test_mirror_is_yaw_flip():
    m = torch.tensor(_label([0, 90, 0], [0, 0, 0]), dtype=torch.float32)[None]
    np.testing.assert_allclose(pose_label.mirror_cam2world(m)[0].numpy(), _label([0, -90, 0], [0, 0, 0]), atol=1e-6)
    angles = torch.tensor([[0.1, -0.4, 0.2], [-0.3, 0.7, -0.1]])
    trans = torch.tensor([[0.2, -0.1, 0.3], [-0.5, 0.4, 0.1]])
    a2, t2 = pose_label.mirror_pose(angles, trans)
    np.testing.assert_allclose(pose_label.pose_to_cam2world(a2, t2).numpy(),
                               pose_label.mirror_cam2world(pose_label.pose_to_cam2world(angles, trans)).numpy(), atol=1e-6)
    lab = pose_label.pose_to_label(angles, trans)
    mirrored = pose_label.mirror_label(pose_label.mirror_label(lab))
    np.testing.assert_allclose(mirrored.numpy(), lab.numpy(), atol=1e-7)


def test_head_angles_round_trip():
    angles = np.array([0.2, -0.6, 0.15])
    m = pose_label.pose_to_cam2world(torch.tensor(angles[None]), torch.tensor([[0.1, 0.2, 0.3]]))[0].numpy()
    np.testing.assert_allclose(pose_label.cam2world_to_head_angles(m), angles, atol=1e-6)
    # Our frontal orbit camera has zero head angles.
    m = coords.cam2world_look_at(torch.tensor(math.pi / 2), torch.tensor(math.pi / 2))[0].numpy()
    np.testing.assert_allclose(pose_label.cam2world_to_head_angles(m), 0, atol=1e-6)


def test_deep3d_mat(tmp_path):
    scipy.io.savemat(tmp_path / 'a.mat', {'angle': [[0.1, 0.2, 0.3]], 'trans': [[1, 2, 3]], 'id': np.zeros([1, 80])})
    angle, trans = pose_label.load_deep3d_mat(str(tmp_path / 'a.mat'))
    np.testing.assert_allclose(angle, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(trans, [1, 2, 3])
    coeff = np.arange(257, dtype=np.float64)
    scipy.io.savemat(tmp_path / 'b.mat', {'coeffs': coeff[None]})
    angle, trans = pose_label.load_deep3d_mat(str(tmp_path / 'b.mat'))
    np.testing.assert_allclose(angle, [224, 225, 226])
    np.testing.assert_allclose(trans, [254, 255, 256])
    scipy.io.savemat(tmp_path / 'c.mat', {'coeffs': coeff[None, :250]})
    with pytest.raises(ValueError, match='250 values'):
        pose_label.load_deep3d_mat(str(tmp_path / 'c.mat'))
    (tmp_path / 'd.mat').write_text('junk')
    with pytest.raises(ValueError, match='d.mat'):
        pose_label.load_deep3d_mat(str(tmp_path / 'd.mat'))


def test_landmark_files_and_mirror(tmp_path):
    p = tmp_path / 'x.txt'
    p.write_text('10 20\n30 40\n50 60\n70 80\n90 100\n')
    np.testing.assert_allclose(landmarks.read_landmarks_txt(str(p))[0], [10.5, 20.5])
    p.write_text('10 20 5\n30 40 5\n')
    with pytest.raises(ValueError, match='x.txt'):
        landmarks.read_landmarks_txt(str(p))
    p.write_text('10 20\n30 40\n')
    with pytest.raises(ValueError, match='5 or 68'):
        landmarks.read_landmarks_txt(str(p))
    assert sorted(landmarks.IBUG_MIRROR) == list(range(68))
    lm = np.random.rand(68, 2) * 100
    np.testing.assert_allclose(landmarks.mirror_landmarks_2d(landmarks.mirror_landmarks_2d(lm, 100), 100), lm)
    m = landmarks.mirror_landmarks_2d(lm, 100)
    np.testing.assert_allclose(m[36], [100 - lm[45, 0], lm[45, 1]])      # outer eye corners swap
