"""FID, KID and the mesh depth error: maths against independent computations, caching, the CLI.

The Inception network is replaced by a stand-in TorchScript detector written to tmp_path
(a fixed random projection of 4x4-pooled pixels) with the same call signature.
"""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from metrics import frechet_inception_distance as fid_lib
from metrics import kernel_inception_distance as kid_lib
from metrics import mesh_depth_error
from metrics import metric_main
from metrics import metric_utils
from tests import train_helpers as th
from torch_utils import persistence
from training import builders
from training import coords

# The detector format is TorchScript (as the standard Inception file); PyTorch now warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')


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
    with pytest.raises(FileNotFoundError, match='NEXT3D_INCEPTION'):
        metric_utils.detector_path(None)
    with pytest.raises(FileNotFoundError, match='nope.pt: no such detector'):
        metric_utils.detector_path(str(tmp_path / 'nope.pt'))
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
    result = CliRunner().invoke(calc_metrics.main, ['--network', snap, '--metrics', 'fid_tiny,kid_tiny', '--detector', detector])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in open(run_dir / 'metric-fid_tiny.jsonl')]
    assert len(lines) == 1 and lines[0]['snapshot_pkl'] == 'network-snapshot-000000.pkl'
    fid = lines[0]['results']['fid_tiny']
    assert np.isfinite(fid) and fid > 0
    kid = json.loads(open(run_dir / 'metric-kid_tiny.jsonl').readline())['results']['kid_tiny']
    assert np.isfinite(kid)
    assert f'fid_tiny: fid_tiny {fid:.4g}' in result.output
    bad = CliRunner().invoke(calc_metrics.main, ['--network', snap, '--metrics', 'fid_tiny', '--detector', str(tmp_path / 'x.pt')])
    assert bad.exit_code != 0 and 'x.pt: no such detector' in bad.output


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

        def forward(self, z, c, v, noise_mode='const'):
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
