"""The bundled procedural head model (data/head_model): files, topology, landmarks, jaw, UVs."""

import collections
import os

import numpy as np
import pytest
import torch

from dataset_preprocessing.head_model.make_head_model import CENTRE, write_head_model
from training import coords
from training.mesh.flame_pickle import load_flame_pickle, load_landmark_embedding
from training.mesh.head_model import default_head_model_dir, load_head_model, load_template, load_uv_mask
from training.mesh.obj_io import read_landmarks, read_obj, write_obj

DATA = default_head_model_dir()
FILES = ['generic_model.pkl', 'head_template.obj', 'landmark_embedding.npy', 'uv_face_eye_mask.png',
         'neutral.obj', 'neutral_lms.txt', 'README.md']


@pytest.fixture(scope='module')
def model():
    return load_flame_pickle(os.path.join(DATA, 'generic_model.pkl'))


@pytest.fixture(scope='module')
def flame():
    return load_head_model(dtype=torch.float64)


def test_script_is_deterministic_and_matches_committed_files(tmp_path):
    write_head_model(str(tmp_path / 'a'))
    write_head_model(str(tmp_path / 'b'))
    for name in FILES:
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes(), name
    # The committed files are this script's output (to float rounding: other platforms' libm
    # may differ in the last bit).
    ours, committed = load_flame_pickle(tmp_path / 'a' / 'generic_model.pkl'), load_flame_pickle(os.path.join(DATA, 'generic_model.pkl'))
    for key in committed:
        np.testing.assert_allclose(ours[key], committed[key], atol=1e-6, err_msg=key)
    ours, committed = read_obj(tmp_path / 'a' / 'head_template.obj'), read_obj(os.path.join(DATA, 'head_template.obj'))
    np.testing.assert_array_equal(ours.f, committed.f)
    np.testing.assert_array_equal(ours.ft, committed.ft)
    np.testing.assert_allclose(ours.vt, committed.vt, atol=1e-6)
    np.testing.assert_allclose(read_landmarks(tmp_path / 'a' / 'neutral_lms.txt'), read_landmarks(os.path.join(DATA, 'neutral_lms.txt')), atol=1e-6)
    ours, committed = load_landmark_embedding(tmp_path / 'a' / 'landmark_embedding.npy'), load_landmark_embedding(os.path.join(DATA, 'landmark_embedding.npy'))
    np.testing.assert_array_equal(ours['full_lmk_faces_idx'], committed['full_lmk_faces_idx'])
    mask_ours, mask_committed = load_uv_mask(tmp_path / 'a' / 'uv_face_eye_mask.png'), load_uv_mask(os.path.join(DATA, 'uv_face_eye_mask.png'))
    assert (mask_ours != mask_committed).float().mean() < 1e-3


def test_sizes(model):
    v, f = model['v_template'], model['f']
    assert 4500 <= len(v) <= 5500
    assert model['shapedirs'].shape == (len(v), 3, 24) and model['n_shape_components'] == 12
    assert model['posedirs'].shape == (len(v), 3, 36)
    assert model['J_regressor'].shape == (5, len(v)) and model['weights'].shape == (len(v), 5)
    np.testing.assert_allclose(model['weights'].sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(model['J_regressor'].sum(1), 1, atol=1e-6)
    assert model['kintree_table'][0, 1:].tolist() == [0, 1, 1, 1]
    mesh = read_obj(os.path.join(DATA, 'head_template.obj'))
    np.testing.assert_allclose(mesh.v, v, atol=1e-6)
    np.testing.assert_array_equal(mesh.f, f)
    assert len(mesh.vt) != len(v) and mesh.vt.min() >= 0 and mesh.vt.max() <= 1
    assert os.path.getsize(os.path.join(DATA, 'generic_model.pkl')) < 6e6


def _boundary_loops(faces):
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1)
    uniq, count = np.unique(edges, axis=0, return_counts=True)
    adj = collections.defaultdict(list)
    for a, b in uniq[count == 1]:
        adj[a].append(b)
        adj[b].append(a)
    loops, seen = [], set()
    for start in adj:
        if start in seen:
            continue
        loop, stack = [], [start]
        while stack:
            x = stack.pop()
            if x not in seen:
                seen.add(x)
                loop.append(x)
                stack += adj[x]
        loops.append(np.array(loop))
    return loops, count


def test_consistently_wound_and_closed_except_neck_and_mouth(model):
    v, f = model['v_template'].astype(np.float64), model['f']
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    # Every edge is used at most once per direction: neighbours have opposite orientation.
    assert len(np.unique(directed, axis=0)) == len(directed)
    loops, count = _boundary_loops(f)
    assert count.max() == 2
    assert len(loops) == 2
    neck, mouth = sorted(loops, key=lambda loop: v[loop, 1].mean())
    assert v[neck, 1].max() < -0.12                       # the neck cut
    lms = read_landmarks(os.path.join(DATA, 'neutral_lms.txt'))
    assert np.abs(v[mouth, 1] - lms[62, 1]).max() < 0.003  # the lip slit, at the lips
    assert np.abs(v[mouth, 0]).max() < np.abs(lms[48, 0]) + 0.002
    # Outward normals: the head surface is star-shaped around CENTRE; eyeballs are spheres.
    tri = v[f]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    eye = model['weights'][f[:, 0], 3:].sum(1) > 0.5
    centre = np.where(eye[:, None], (model['J_regressor'][3:] @ v)[(model['weights'][f[:, 0], 4] > 0.5).astype(int)], CENTRE)
    assert (np.einsum('ij,ij->i', normal, tri.mean(1) - centre) > 0).all()
    assert (np.linalg.norm(normal, axis=1) > 1e-9).all()


def test_placement_in_world_cube(model):
    v = torch.from_numpy(model['v_template'])
    world = coords.mesh_to_world(v[v[:, 1] > -0.17])
    assert world.abs().max() < 0.5
    lms = torch.from_numpy(read_landmarks(os.path.join(DATA, 'neutral_lms.txt')))
    nose_z = coords.mesh_to_world(lms[30])[2]
    assert 0.2 < nose_z < 0.3
    head = model['v_template']
    width = np.ptp(head[np.abs(head[:, 2] - 0.0) < 0.02, 0])  # includes the ears
    assert 0.14 < width < 0.19
    assert 0.21 < head[:, 1].max() - lms[8, 1] < 0.25        # chin to crown


def test_landmarks_in_ibug_order(flame):
    v, lms = flame()
    lms = lms[0].numpy()
    np.testing.assert_allclose(lms, read_landmarks(os.path.join(DATA, 'neutral_lms.txt')), atol=1e-6)
    x, y, z = lms.T
    assert x[48] < x[54]                                        # image left = subject's right = -x
    assert np.argmax(z) == 30                                   # nose tip in front
    assert np.argmin(y) == 8                                    # chin lowest
    assert (x[0:8] < 0).all() and (x[9:17] > 0).all() and abs(x[8]) < 1e-3
    assert (np.diff(y[0:9]) < 0).all() and (np.diff(y[8:17]) > 0).all()
    assert (np.diff(y[27:31]) < 0).all()                        # nose bridge downwards
    assert (np.diff(x[31:36]) > 0).all() and (np.diff(x[17:22]) > 0).all() and (np.diff(x[22:27]) > 0).all()
    assert x[36] < x[39] < 0 < x[42] < x[45]                    # eye corners
    assert y[37] > y[41] and y[44] > y[46]                      # upper lids above lower lids
    assert min(y[17:27]) > max(y[36:48]) > min(y[36:48]) > y[30] > y[33] > y[51] > y[57] > y[8]
    assert y[51] > y[62] >= y[66] > y[57]
    # Left-right symmetry: iBUG's mirror pairs.
    mirror = list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30, 35, 34, 33, 32, 31] + \
        [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40] + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + \
        [64, 63, 62, 61, 60, 67, 66, 65]
    np.testing.assert_allclose(lms[mirror] * [-1, 1, 1], lms, atol=1.5e-3)


def test_jaw_opens_a_real_mouth_hole(flame, model):
    jaw = torch.tensor([[np.deg2rad(20.0), 0, 0]], dtype=torch.float64)
    v0, l0 = flame()
    v1, l1 = flame(jaw_pose=jaw)
    gap0 = (l0[0, 62] - l0[0, 66]).norm().item()
    gap1 = (l1[0, 62] - l1[0, 66]).norm().item()
    assert gap0 < 1e-6 and gap1 > 0.005 + gap0
    shift = (v1 - v0)[0].norm(dim=-1)
    jaw_weight = torch.from_numpy(model['weights'][:, 2])
    assert (shift[jaw_weight == 0] == 0).all() and (shift[jaw_weight > 0.5] > 1e-3).all()
    # Front orthographic view: the open mouth is background enclosed by the mesh.
    from scipy import ndimage
    from dataset_preprocessing.head_model.render_head_model_docs import zbuffer
    size = 128
    def covered(verts):
        q = verts.numpy()
        tri = q[model['f']]
        normal_z = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])[:, 2]
        px = np.stack([(q[:, 0] * 5 + 1) * size / 2, (1 - q[:, 1] * 5) * size / 2], -1)   # +-0.2 m view
        return zbuffer(px, q[:, 2], model['f'][normal_z > 0], size) >= 0
    def to_px(p):
        return int((p[1] * -5 + 1) * size / 2), int((p[0] * 5 + 1) * size / 2)
    for verts, lms, is_open in ((v0[0], l0[0], False), (v1[0], l1[0], True)):
        cover = covered(verts)
        labels, _ = ndimage.label(~cover)
        outside = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
        r, c = to_px(((lms[62] + lms[66]) / 2).numpy())
        enclosed_hole = (not cover[r, c]) and labels[r, c] not in outside
        assert enclosed_hole == is_open


def test_expressions_move_the_right_parts(flame):
    base_v, base = flame()
    smile = torch.zeros(1, flame.n_exp, dtype=torch.float64)
    smile[0, 0] = 1.0
    _, lms = flame(expression=smile)
    assert (lms[0, [48, 54], 1] - base[0, [48, 54], 1] > 0.003).all()    # corners up
    assert (lms[0, 8] - base[0, 8]).norm() < 1e-4                       # chin still
    width = torch.zeros(1, flame.n_shape, dtype=torch.float64)
    width[0, 0] = 1.0
    v, _ = flame(shape=width)
    assert np.ptp(v[0, :, 0].numpy()) > np.ptp(base_v[0, :, 0].numpy()) + 0.005
    blink = torch.zeros(1, flame.n_exp, dtype=torch.float64)
    blink[0, 4] = 1.0                                                    # blink left (+x)
    v, _ = flame(expression=blink)
    moved = (v - base_v)[0].norm(dim=-1) > 1e-5
    assert (base_v[0, moved, 0] > 0).all() and moved.sum() > 10


def test_uv_template_and_mask(model):
    faces, uv, uvfaces = load_template(os.path.join(DATA, 'head_template.obj'))
    mask = load_uv_mask(os.path.join(DATA, 'uv_face_eye_mask.png'))
    assert mask.shape == (256, 256) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert 0.1 < mask.mean() < 0.5
    emb = load_landmark_embedding(os.path.join(DATA, 'landmark_embedding.npy'))
    def mask_at_landmark(k):
        fi, bary = emb['full_lmk_faces_idx'][0, k], emb['full_lmk_bary_coords'][0, k]
        u, v = (bary[:, None] * uv[uvfaces[fi]].numpy()).sum(0)
        return mask[min(int((1 - v) * 256), 255), min(int(u * 256), 255)].item()
    assert all(mask_at_landmark(k) == 1.0 for k in (8, 19, 30, 36, 45, 48, 57))
    assert mask[128, 2] == 0 and mask[2, 128] == 0                        # back of the head, crown
    torch.testing.assert_close(faces, torch.from_numpy(model['f']))


def test_template_and_mask_errors(tmp_path):
    write_obj(tmp_path / 'novt.obj', np.eye(3), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r'novt\.obj: template needs texture coordinates'):
        load_template(tmp_path / 'novt.obj')
    from PIL import Image
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / 'small.png')
    with pytest.raises(ValueError, match=r'small\.png: expected a 256x256 mask'):
        load_uv_mask(tmp_path / 'small.png')


def test_no_folded_faces_within_the_documented_ranges(flame, model):
    """Adjacent faces never flip against each other (dihedral > 107 degrees) for jaw
    openings up to 15 degrees, each expression at +1.5 (and -1.5 where both signs are
    meaningful) and each identity component at +-1; inside the eye openings (hidden by
    the eyeballs) a crease is tolerated."""
    f = model['f']
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1)
    face_of = np.tile(np.arange(len(f)), 3)
    order = np.lexsort((edges[:, 1], edges[:, 0]))
    shared = (edges[order][1:] == edges[order][:-1]).all(1)
    fa, fb = face_of[order][:-1][shared], face_of[order][1:][shared]
    v0 = model['v_template']
    from dataset_preprocessing.head_model.make_head_model import EYE_CENTRE, EYE_OPENING
    in_eye = (((np.abs(v0[:, 0]) - EYE_CENTRE[0]) / EYE_OPENING[0]) ** 2 + ((v0[:, 1] - EYE_CENTRE[1]) / EYE_OPENING[1]) ** 2 < 1.5) & (v0[:, 2] > 0.03)
    counted = ~(in_eye[f[fa]].any(1) | in_eye[f[fb]].any(1))

    def n_folds(verts):
        tri = verts[:, torch.from_numpy(f)]
        n = torch.nn.functional.normalize(torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0]), dim=-1)
        return (((n[:, fa] * n[:, fb]).sum(-1) < -0.3) & torch.from_numpy(counted)).sum(1)
    both_signs = [0, 1, 2, 3, 6, 9, 10, 11]              # smile, brows, pucker, stretch, puff, wrinkle, frown
    exp = torch.cat([1.5 * torch.eye(flame.n_exp), -1.5 * torch.eye(flame.n_exp)[both_signs]]).double()
    shape = torch.cat([torch.eye(flame.n_shape), -torch.eye(flame.n_shape)]).double()
    jaw = torch.tensor([[np.deg2rad(a), 0, 0] for a in (0, 5, 10, 15)], dtype=torch.float64)
    assert n_folds(flame(expression=exp)[0]).tolist() == [0] * len(exp)
    assert n_folds(flame(shape=shape)[0]).tolist() == [0] * len(shape)
    assert n_folds(flame(jaw_pose=jaw)[0]).tolist() == [0] * len(jaw)
