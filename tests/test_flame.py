"""Linear blend skinning and the FLAME layer, on tiny hand-built models."""

import io
import math
import pickle

import numpy as np
import pytest
import torch

from training.mesh.flame import FlameModel
from training.mesh.lbs import axis_angle_to_matrix, check_parents, linear_blend_skinning


def test_rodrigues_matches_scipy():
    from scipy.spatial.transform import Rotation
    rvec = torch.tensor([[0.0, 0.0, 0.0], [1e-5, -2e-5, 3e-5], [0.3, -1.2, 0.5], [math.pi, 0, 0]], dtype=torch.float64)
    ours = axis_angle_to_matrix(rvec)
    ref = torch.from_numpy(Rotation.from_rotvec(rvec.numpy()).as_matrix())
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


def test_lbs_two_joint_chain_by_hand():
    # Root joint at the origin, child at (0, 1, 0); v0 on the root, v1 on the child, v2 half/half.
    v = torch.tensor([[[1.0, 0, 0], [0, 2, 0], [1, 1, 0]]], dtype=torch.float64)
    j_reg = torch.tensor([[0.0, 0, 0], [0, 0.5, 0]], dtype=torch.float64)      # joint 1 = v1 / 2
    weights = torch.tensor([[1.0, 0], [0, 1], [0.5, 0.5]], dtype=torch.float64)
    quarter = math.pi / 2
    # Child rotated 90 degrees about z: v1 -> (-1, 1, 0); v2 -> 0.5 (1, 1, 0) + 0.5 (0, 2, 0).
    pose = torch.tensor([[[0, 0, 0], [0, 0, quarter]]], dtype=torch.float64)
    out, joints = linear_blend_skinning(v, pose, j_reg, [-1, 0], weights)
    torch.testing.assert_close(out[0], torch.tensor([[1.0, 0, 0], [-1, 1, 0], [0.5, 1.5, 0]], dtype=torch.float64))
    torch.testing.assert_close(joints[0], torch.tensor([[0.0, 0, 0], [0, 1, 0]], dtype=torch.float64))
    # Root rotated 90 degrees about z: everything turns about the origin.
    pose = torch.tensor([[[0, 0, quarter], [0, 0, 0]]], dtype=torch.float64)
    out, joints = linear_blend_skinning(v, pose, j_reg, [-1, 0], weights)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 1, 0], [-2, 0, 0], [-1, 1, 0]], dtype=torch.float64))
    torch.testing.assert_close(joints[0], torch.tensor([[0.0, 0, 0], [-1, 0, 0]], dtype=torch.float64))
    # Both: the child's rotation composes with the root's (180 degrees in total for v1).
    pose = torch.tensor([[[0, 0, quarter], [0, 0, quarter]]], dtype=torch.float64)
    out, _ = linear_blend_skinning(v, pose, j_reg, [-1, 0], weights)
    torch.testing.assert_close(out[0, 1], torch.tensor([-1.0, -1, 0], dtype=torch.float64))


def test_pose_correctives_layout():
    # One vertex, two joints; posedirs column 0 is driven by (R - I)[0, 0] of joint 1.
    v = torch.zeros(1, 1, 3, dtype=torch.float64)
    posedirs = torch.zeros(1, 3, 9, dtype=torch.float64)
    posedirs[0, 1, 0] = 2.0
    posedirs[0, 2, 5] = 3.0        # (R - I)[1, 2]
    weights = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    a = 0.4
    pose = torch.tensor([[[0, 0, 0], [a, 0, 0]]], dtype=torch.float64)       # about x: R[1, 2] = -sin a
    out, _ = linear_blend_skinning(v, pose, torch.zeros(2, 1, dtype=torch.float64), [-1, 0], weights, posedirs)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 0.0, -3 * math.sin(a)], dtype=torch.float64))


def test_check_parents():
    assert check_parents(np.array([4294967295, 0, 1, 1, 1], dtype=np.int64)) == [-1, 0, 1, 1, 1]
    with pytest.raises(ValueError, match='parents must come before'):
        check_parents([-1, 2, 0])


def _tiny_flame(tmp_path, posedirs_scale=0.01, embedding='full'):
    """A FLAME-format model with 10 vertices (2 jaw-bound, 2 per eye) and its landmark embedding."""
    rng = np.random.default_rng(3)
    n = 10
    v = rng.normal(scale=0.05, size=(n, 3))
    weights = np.zeros((n, 5))
    weights[:4, 1] = 1.0                   # head
    weights[4, 0], weights[5, 0] = 0.7, 0.7
    weights[4, 1], weights[5, 1] = 0.3, 0.3
    weights[6:8, 2] = 1.0                  # jaw
    weights[8, 3] = weights[9, 4] = 1.0    # eyes
    j_reg = np.zeros((5, n))
    for j, verts in enumerate(([4, 5], [0, 1], [6, 7, 2], [8], [9])):
        j_reg[j, verts] = 1.0 / len(verts)
    faces = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 6], [3, 6, 7], [4, 5, 0], [0, 8, 9]])
    model = {
        'v_template': v, 'f': faces, 'weights': weights, 'J_regressor': j_reg,
        'shapedirs': rng.normal(scale=0.01, size=(n, 3, 5)),            # 3 shape + 2 expression
        'posedirs': rng.normal(scale=posedirs_scale, size=(n, 3, 36)),
        'kintree_table': np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),   # as in FLAME
        'n_shape_components': np.array(3),
    }
    (tmp_path / 'generic_model.pkl').write_bytes(pickle.dumps(model, protocol=4))
    idx = rng.integers(0, len(faces), 68)
    bary = rng.random((68, 3))
    bary /= bary.sum(1, keepdims=True)
    if embedding == 'full':
        emb = {'full_lmk_faces_idx': idx[None], 'full_lmk_bary_coords': bary[None]}
    else:
        dyn_idx = rng.integers(0, len(faces), (79, 17))
        dyn_bary = np.full((79, 17, 3), 1 / 3)
        emb = {'static_lmk_faces_idx': idx[17:], 'static_lmk_bary_coords': bary[17:],
               'dynamic_lmk_faces_idx': dyn_idx, 'dynamic_lmk_bary_coords': dyn_bary}
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=True)
    (tmp_path / 'landmark_embedding.npy').write_bytes(buf.getvalue())
    return model, emb


def _load(tmp_path, **kwargs):
    return FlameModel(str(tmp_path / 'generic_model.pkl'), str(tmp_path / 'landmark_embedding.npy'), **kwargs)


def test_shape_expression_and_landmarks(tmp_path):
    model, emb = _tiny_flame(tmp_path)
    flame = _load(tmp_path, n_shape=2, n_exp=2, dtype=torch.float64)
    shape = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    exp = torch.tensor([[2.0, 0.3]], dtype=torch.float64)
    verts, lms = flame(shape=shape, expression=exp)
    sd = model['shapedirs']
    expected = model['v_template'] + sd[:, :, 0] * 0.5 - sd[:, :, 1] + sd[:, :, 3] * 2.0 + sd[:, :, 4] * 0.3
    np.testing.assert_allclose(verts[0].numpy(), expected, atol=1e-7)   # the file is read as float32
    tri = expected[model['f'][emb['full_lmk_faces_idx'][0]]]
    np.testing.assert_allclose(lms[0].numpy(), (emb["full_lmk_bary_coords"][0][..., None] * tri).sum(1), atol=1e-7)  # float32 barycentrics
    t = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    verts_t, lms_t = flame(shape=shape, expression=exp, translation=t)
    torch.testing.assert_close(verts_t, verts + t[:, None])
    torch.testing.assert_close(lms_t, lms + t[:, None])
    with pytest.raises(ValueError, match=r'expression must have shape \(1, 2\)'):
        flame(shape=shape, expression=torch.zeros(1, 3, dtype=torch.float64))


def test_root_rotation_is_rigid(tmp_path):
    model, _ = _tiny_flame(tmp_path, posedirs_scale=0.05)
    flame = _load(tmp_path, dtype=torch.float64)
    rvec = torch.tensor([[0.3, -0.7, 0.2]], dtype=torch.float64)
    neck = torch.tensor([[0.1, 0.2, 0.0]], dtype=torch.float64)
    v0, l0 = flame(neck_pose=neck)
    v1, l1 = flame(neck_pose=neck, global_pose=rvec)
    root = torch.from_numpy(model['J_regressor'][0] @ model['v_template'])
    rot = axis_angle_to_matrix(rvec[0])
    torch.testing.assert_close(v1[0], (v0[0] - root) @ rot.T + root)
    torch.testing.assert_close(l1[0], (l0[0] - root) @ rot.T + root)


def test_jaw_moves_only_jaw_vertices(tmp_path):
    model, _ = _tiny_flame(tmp_path, posedirs_scale=0.0)
    flame = _load(tmp_path, dtype=torch.float64)
    v0, _ = flame()
    v1, _ = flame(jaw_pose=torch.tensor([[0.35, 0.0, 0.0]], dtype=torch.float64))
    moved = (v1 - v0).norm(dim=-1)[0] > 1e-12
    assert moved.tolist() == (model['weights'][:, 2] > 0).tolist()
    # The jaw vertices turn about the jaw joint: distances to it are preserved.
    jaw = torch.from_numpy(model['J_regressor'][2] @ model['v_template'])
    torch.testing.assert_close((v1[0, 6:8] - jaw).norm(dim=-1), (v0[0, 6:8] - jaw).norm(dim=-1))


def test_dynamic_contour_follows_yaw(tmp_path):
    model, emb = _tiny_flame(tmp_path, embedding='static_dynamic')
    flame = _load(tmp_path, dtype=torch.float64)
    yaw = math.radians(10)
    verts, lms = flame(global_pose=torch.tensor([[0.0, yaw, 0.0]], dtype=torch.float64))
    f = model['f']
    for deg_bin, check in ((49, lms),):      # yaw +10 degrees -> DECA bin 39 + 10
        tri = verts[0].numpy()[f[emb['dynamic_lmk_faces_idx'][deg_bin]]]
        np.testing.assert_allclose(check[0, :17].numpy(), tri.mean(1), atol=1e-7)
    tri = verts[0].numpy()[f[emb['static_lmk_faces_idx']]]
    np.testing.assert_allclose(lms[0, 17:].numpy(), (emb["static_lmk_bary_coords"][..., None] * tri).sum(1), atol=1e-7)


def test_gradcheck(tmp_path):
    _tiny_flame(tmp_path, posedirs_scale=0.05)
    flame = _load(tmp_path, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, k, generator=gen, dtype=torch.float64).mul_(0.3).requires_grad_() for k in (3, 2, 3, 3, 3, 6)]

    def fn(shape, exp, glob, neck, jaw, eye):
        v, l = flame(shape=shape, expression=exp, global_pose=glob, neck_pose=neck, jaw_pose=jaw, eye_pose=eye)
        return v, l
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda jaw: fn(*inputs[:4], jaw, inputs[5])[0], inputs[4])   # full Jacobian, jaw only
    # Zero rotation (the Taylor branch of Rodrigues) is differentiable too.
    zero = [torch.zeros(1, k, dtype=torch.float64, requires_grad=True) for k in (3, 2, 3, 3, 3, 6)]
    assert torch.autograd.gradcheck(fn, zero, fast_mode=True)


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path):
    _tiny_flame(tmp_path, posedirs_scale=0.05)
    flame = _load(tmp_path)
    gen = torch.Generator().manual_seed(1)
    args = dict(shape=torch.randn(4, 3, generator=gen), expression=torch.randn(4, 2, generator=gen),
                jaw_pose=0.3 * torch.randn(4, 3, generator=gen), eye_pose=0.2 * torch.randn(4, 6, generator=gen))
    v_cpu, l_cpu = flame(**args)
    v_gpu, l_gpu = flame.to('cuda')(**{k: t.cuda() for k, t in args.items()})
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, atol=1e-6, rtol=1e-5)
