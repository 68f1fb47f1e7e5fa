"""MeshImageDataset: layouts, labels, meshes, mirroring, packing, and clear errors on bad data."""

import json
import os
import shutil
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dataset_tool
from tests import train_helpers as th
from training import coords
from training.dataset import LANDMARK_MIRROR, DatasetError, MeshImageDataset, mirror_label
from training.mesh import obj_io
from training.mesh.rasterize import project_perspective


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return th.make_dataset(str(tmp_path_factory.mktemp('ds') / 'root'), count=6, resolution=16, exp_dim=3)


def fresh_copy(data_root, tmp_path):
    dst = str(tmp_path / 'copy')
    shutil.copytree(data_root, dst)
    return dst


def test_items_match_the_files(data_root):
    ds = MeshImageDataset(data_root)
    assert len(ds) == 6 and ds.resolution == 16 and ds.num_vertices == th.NUM_VERTICES and ds.label_dim == 28
    labels = dict((k, v) for k, v in json.load(open(os.path.join(data_root, 'images16x16', 'dataset.json')))['labels'])
    exps = dict((k, v) for k, v in json.load(open(os.path.join(data_root, 'images16x16', 'dataset_exp.json')))['labels'])
    for i in range(len(ds)):
        img, label, v = ds[i]
        rel = ds.get_details(i)['relpath']
        stem = os.path.splitext(rel)[0]
        assert img.dtype == np.uint8 and img.shape == (3, 16, 16)
        np.testing.assert_array_equal(img, np.asarray(PIL.Image.open(os.path.join(data_root, 'images16x16', rel))).transpose(2, 0, 1))
        assert label.dtype == np.float32 and label.shape == (28,)
        np.testing.assert_allclose(label[:25], labels[rel], rtol=1e-6)
        np.testing.assert_allclose(label[25:], exps[rel], rtol=1e-6)
        assert v.dtype == np.float32 and v.shape == (th.NUM_VERTICES + 68, 3)
        np.testing.assert_allclose(v[:-68], obj_io.read_obj_vertices(os.path.join(data_root, 'meshes16x16', stem + '.obj')))
        np.testing.assert_allclose(v[-68:], obj_io.read_landmarks(os.path.join(data_root, 'lms16x16', stem + '.txt')))


def test_layout_variants_give_the_same_items(data_root, tmp_path):
    ref = MeshImageDataset(data_root)
    # Next3D's command line: --data=images folder (meshes found as its sibling), --rdata=meshes folder.
    as_images = MeshImageDataset(os.path.join(data_root, 'images16x16'))
    as_rdata = MeshImageDataset(os.path.join(data_root, 'images16x16'), mesh_path=os.path.join(data_root, 'meshes16x16'))
    # A zip of the root, and the original's label file name.
    zpath = str(tmp_path / 'root.zip')
    with zipfile.ZipFile(zpath, 'w') as z:
        for folder, _, files in os.walk(data_root):
            for f in files:
                full = os.path.join(folder, f)
                z.write(full, os.path.relpath(full, data_root))
    as_zip = MeshImageDataset(zpath)
    mead = fresh_copy(data_root, tmp_path)
    os.rename(os.path.join(mead, 'images16x16', 'dataset.json'), os.path.join(mead, 'images16x16', 'dataset_mead.json'))
    as_mead = MeshImageDataset(mead)
    for other in (as_images, as_rdata, as_zip, as_mead):
        assert len(other) == len(ref)
        for i in range(len(ref)):
            for a, b in zip(ref[i], other[i]):
                np.testing.assert_array_equal(a, b)


def test_a_forked_process_reads_the_zip_through_its_own_handle(data_root, tmp_path):
    """DataLoader workers are forked from a process that has already read the zip: a handle they
    inherit shares its file offset with the parent's, and reads racing on it failed with
    'Bad CRC-32' (seen in training). A child reads through a handle of its own."""
    zpath = str(tmp_path / 'root.zip')
    with zipfile.ZipFile(zpath, 'w') as z:
        for root, _dirs, files in os.walk(data_root):
            for f in files:
                z.write(os.path.join(root, f), os.path.relpath(os.path.join(root, f), data_root))
    dataset = MeshImageDataset(zpath)
    first = dataset[0][0]                          # the parent opens its handle
    fd = dataset._files._zip.fp.fileno()
    offset = os.lseek(fd, 0, os.SEEK_CUR)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # child: read another item, report the bytes' checksum
        try:
            os.write(write, str(int(dataset[len(dataset) - 1][0].astype(np.int64).sum())).encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(write)
    child_sum = int(os.read(read, 64).decode())
    os.close(read)
    assert os.lseek(fd, 0, os.SEEK_CUR) == offset, 'the child moved the file offset of the parent\'s handle'
    assert child_sum == int(dataset[len(dataset) - 1][0].astype(np.int64).sum())
    np.testing.assert_array_equal(dataset[0][0], first)


def test_max_size_and_no_labels(data_root):
    ds = MeshImageDataset(data_root, max_size=3, random_seed=1, use_labels=False)
    assert len(ds) == 3
    assert len({ds.get_details(i)['relpath'] for i in range(3)}) == 3
    assert not ds.get_label(0).any()
    assert MeshImageDataset(data_root, max_size=3, random_seed=1).get_details(2) == ds.get_details(2)


def test_landmark_mirror_order_is_ibug():
    perm = np.array(LANDMARK_MIRROR)
    assert sorted(perm) == list(range(68))
    np.testing.assert_array_equal(perm[perm], np.arange(68))         # an involution
    for a, b in [(0, 16), (8, 8), (17, 26), (36, 45), (39, 42), (41, 46), (31, 35), (30, 30), (48, 54), (51, 51), (57, 57), (60, 64), (66, 66)]:
        assert perm[a] == b and perm[b] == a


def test_mirror_label_is_eg3d_flip_yaw():
    label = np.arange(25, dtype=np.float32) + 1
    flipped = mirror_label(label)
    cam, cam_f = label[:16].reshape(4, 4), flipped[:16].reshape(4, 4)
    negated = {(0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0)}
    for i in range(4):
        for j in range(4):
            assert cam_f[i, j] == (-cam[i, j] if (i, j) in negated else cam[i, j])
    np.testing.assert_array_equal(mirror_label(flipped), label)


def test_mirror_label_mirrors_the_principal_point():
    """Normalised intrinsics: an off-centre cx moves to 1 - cx; focal lengths and cy stay, the skew changes sign."""
    intrinsics = np.array([[4.2647, 0.01, 0.3], [0, 4.2647, 0.45], [0, 0, 1]], dtype=np.float32)
    label = np.concatenate([np.eye(4, dtype=np.float32).reshape(-1), intrinsics.reshape(-1)])
    mirrored = mirror_label(label)[16:25].reshape(3, 3)
    np.testing.assert_allclose(mirrored, [[4.2647, -0.01, 0.7], [0, 4.2647, 0.45], [0, 0, 1]], rtol=0, atol=1e-6)


def test_mirrored_item_is_the_mirror_image(data_root):
    """Mirrored landmarks seen by the mirrored camera land at u -> 1 - u of the original's pixels."""
    ds = MeshImageDataset(data_root, xflip=True)
    n = ds.num_raw
    assert len(ds) == 2 * n
    for i in range(n):
        img, label, v = ds[i]
        img_m, label_m, v_m = ds[i + n]
        np.testing.assert_array_equal(img_m, img[:, :, ::-1])
        np.testing.assert_array_equal(label_m[25:], label[25:])          # expressions unchanged
        lms, lms_m = v[-68:], v_m[-68:]
        np.testing.assert_allclose(lms_m[LANDMARK_MIRROR], lms * [-1, 1, 1], rtol=1e-6)
        # Vertex map: mirrored vertex k sits at the mirror of its partner (k + 6) % 12 in this symmetric test mesh.
        partner = (np.arange(th.NUM_VERTICES) + th.NUM_VERTICES // 2) % th.NUM_VERTICES
        np.testing.assert_allclose(v_m[:-68], v[:-68][partner] * [-1, 1, 1], rtol=1e-6)
        p = project_perspective(coords.mesh_to_world(torch.from_numpy(lms)[None]), torch.from_numpy(label)[None])[0]
        p_m = project_perspective(coords.mesh_to_world(torch.from_numpy(lms_m[LANDMARK_MIRROR])[None]), torch.from_numpy(label_m)[None])[0]
        torch.testing.assert_close(p_m[:, 0], -p[:, 0], atol=1e-5, rtol=0)   # NDC x mirrored
        torch.testing.assert_close(p_m[:, 1:], p[:, 1:], atol=1e-5, rtol=0)


def test_packed_dataset_matches_and_is_used(data_root, tmp_path):
    dest = str(tmp_path / 'packed.zip')
    info = dataset_tool.pack_dataset(data_root, dest)
    assert info['items'] == 6
    with zipfile.ZipFile(dest) as z:
        names = set(z.namelist())
    assert {'dataset.json', 'dataset_exp.json', 'vertices.npy', 'landmarks.npy'} <= names
    assert not any(n.endswith('.obj') for n in names)
    unzipped = str(tmp_path / 'unzipped')
    with zipfile.ZipFile(dest) as z:
        z.extractall(unzipped)
    ref = MeshImageDataset(data_root, xflip=True)
    for packed in (MeshImageDataset(dest, xflip=True), MeshImageDataset(unzipped, xflip=True)):   # in memory / memory-mapped
        assert len(packed) == len(ref)
        for i in range(len(ref)):
            for a, b in zip(ref[i], packed[i]):
                np.testing.assert_array_equal(a, b)


# --- errors -------------------------------------------------------------------------------

def edit_labels(root, fn):
    path = os.path.join(root, 'images16x16', 'dataset.json')
    data = json.load(open(path))
    fn(data['labels'])
    json.dump(data, open(path, 'w'))


@pytest.mark.parametrize('case, names', [
    ('missing_mesh', ['meshes16x16', 'img00000002.obj', 'missing mesh']),
    ('missing_lms', ['lms16x16', 'img00000002.txt', 'missing landmarks']),
    ('vertex_count', ['img00000003.obj', 'vertices']),
    ('short_label', ['dataset.json', 'img00000001.png', '24 values, expected 25']),
    ('nan_label', ['dataset.json', 'img00000001.png', 'non-finite']),
    ('unreadable_image', ['img00000004.png', 'unreadable image']),
    ('no_label_for_image', ['dataset.json', 'no label for image 00000/img00000000.png']),
    ('empty', ['holds no images']),
    ('not_power_of_two', ['img00000000.png', 'not a power of two']),
    ('no_label_file', ['no label file']),
    ('bad_json', ['dataset.json', 'not valid JSON']),
])
def test_bad_dataset_errors_name_the_file(data_root, tmp_path, case, names):
    root = fresh_copy(data_root, tmp_path)
    img_dir = os.path.join(root, 'images16x16', '00000')
    if case == 'missing_mesh':
        os.remove(os.path.join(root, 'meshes16x16', '00000', 'img00000002.obj'))
    elif case == 'missing_lms':
        os.remove(os.path.join(root, 'lms16x16', '00000', 'img00000002.txt'))
    elif case == 'vertex_count':
        obj_io.write_obj(os.path.join(root, 'meshes16x16', '00000', 'img00000003.obj'), np.zeros([5, 3]))
    elif case == 'short_label':
        edit_labels(root, lambda labels: labels[1].__setitem__(1, labels[1][1][:24]))
    elif case == 'nan_label':
        edit_labels(root, lambda labels: labels[1][1].__setitem__(3, float('nan')))
    elif case == 'unreadable_image':
        open(os.path.join(img_dir, 'img00000004.png'), 'wb').write(b'not a png')
    elif case == 'no_label_for_image':
        edit_labels(root, lambda labels: labels.pop(0))
    elif case == 'empty':
        shutil.rmtree(img_dir)
    elif case == 'not_power_of_two':
        for f in os.listdir(img_dir):
            PIL.Image.new('RGB', (12, 12)).save(os.path.join(img_dir, f))
    elif case == 'no_label_file':
        os.remove(os.path.join(root, 'images16x16', 'dataset.json'))
    elif case == 'bad_json':
        open(os.path.join(root, 'images16x16', 'dataset.json'), 'w').write('{"labels": [')
    with pytest.raises(DatasetError) as info:
        MeshImageDataset(root)
    for name in names:
        assert name in str(info.value), str(info.value)


def test_missing_dataset_path(tmp_path):
    with pytest.raises(DatasetError, match='no such dataset'):
        MeshImageDataset(str(tmp_path / 'nothing'))


def test_asymmetric_mesh_refuses_to_mirror(data_root, tmp_path):
    root = fresh_copy(data_root, tmp_path)
    rnd = np.random.RandomState(0)
    for f in sorted(os.listdir(os.path.join(root, 'meshes16x16', '00000'))):
        obj_io.write_obj(os.path.join(root, 'meshes16x16', '00000', f), rnd.uniform(0.01, 0.1, size=(th.NUM_VERTICES, 3)))
    MeshImageDataset(root)          # fine without mirroring
    with pytest.raises(DatasetError, match='not left-right symmetric'):
        MeshImageDataset(root, xflip=True)
