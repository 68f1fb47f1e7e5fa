"""mesh_surface(_tiny) and jaw_control against stand-in generators whose answers are known by hand,
and their reproducibility on a real (tiny, untrained) Next3D generator."""

import math
import os

import numpy as np
import pytest
import torch

from metrics import jaw_control
from metrics import mesh_surface
from metrics import metric_main
from metrics import metric_utils
from tests import train_helpers as th
from training import configs
from training import coords
from training import eg3d_generator
from training.mesh import obj_io
from training.mesh.head_model import default_head_model_dir
from training.mesh.head_model import load_head_model
from training.volumetric_rendering.ray_sampler import RaySampler
from training.volumetric_rendering.renderer import ImportanceRenderer

RAY_LENGTH = coords.RAY_END - coords.RAY_START


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frontal_label(yaw=math.pi / 2):
    """(1, 25) label of a camera on the orbit, frontal by default."""
    return coords.make_label(coords.cam2world_look_at(torch.tensor([yaw]), torch.tensor([math.pi / 2])))


# --- mesh_surface ---------------------------------------------------------------------------------

def raw_sigma(density: float) -> float:
    """The raw sigma whose density softplus(sigma - 1) is `density`."""
    return 1 + math.log(math.expm1(density))


class CoordinateDecoder(torch.nn.Module):
    """Reads the world point and the mesh plane back from CoordinateG's planes -> a density that is
    `density` behind the plane (inside the tri-plane box) and ~0 elsewhere, or `density` everywhere (fog)."""

    def __init__(self, density: float, fog: bool):
        super().__init__()
        self.raw, self.fog = raw_sigma(density), fog

    def forward(self, features, directions):        # features (B, 3, M, C): plane 0 holds (x, y), plane 1 (x, z)
        point = torch.stack([features[:, 0, :, 0], features[:, 0, :, 1], features[:, 1, :, 1]], dim=-1)
        inside = (features[:, :, :, 2] > 0.999).all(dim=1)
        behind = (point * features[:, 0, :, 3:6]).sum(-1) < features[:, 0, :, 6]
        sigma = torch.where((inside & behind) | self.fog, self.raw, -30.0)
        return dict(rgb=torch.zeros(*sigma.shape, 3), sigma=sigma[..., None])


class CoordinateG(torch.nn.Module):
    """Stand-in tri-plane generator: plane features are the world coordinates of their texels (bilinear
    sampling reads them back exactly), a constant 1 (inside the box) and the driving triangle's plane
    (world normal towards the camera, offset). The real ImportanceRenderer and RaySampler render it."""

    def __init__(self, density: float, fog: bool = False, plane_resolution: int = 32):
        super().__init__()
        self.z_dim, self.c_dim, self.neural_rendering_resolution = 4, 25, 16
        self.plane_resolution = plane_resolution
        self.rendering_kwargs = eg3d_generator.make_rendering_kwargs(depth_resolution=24, depth_resolution_importance=24)
        self.renderer, self.ray_sampler = ImportanceRenderer(), RaySampler()
        self.decoder = CoordinateDecoder(density, fog)
        self.rasterizer = torch.nn.Module()
        self.rasterizer.register_buffer('faces', torch.tensor([[0, 1, 2]]))

    def mapping(self, z, c):
        return z[:, None]

    def make_planes(self, ws, v, noise_mode='random'):
        n, res = len(v), self.plane_resolution
        world = coords.mesh_to_world(v[:, :3])
        normal = torch.nn.functional.normalize(torch.cross(world[:, 1] - world[:, 0], world[:, 2] - world[:, 0], dim=-1), dim=-1)
        offset = (normal * world[:, 0]).sum(-1, keepdim=True)
        centres = ((torch.arange(res) + 0.5) / res - 0.5) * coords.BOX_WARP
        planes = torch.zeros(n, 3, 7, res, res)
        for k, (col, row) in enumerate(coords.PLANE_AXES['next3d']):
            planes[:, k, 0] = centres[None, :]       # the column axis' coordinate
            planes[:, k, 1] = centres[:, None]       # the row axis' coordinate
            planes[:, k, 2] = 1
            planes[:, k, 3:] = torch.cat([normal, offset], dim=1)[:, :, None, None]
        return planes


@pytest.fixture(scope='module')
def triangle_data(tmp_path_factory):
    """Eight items whose mesh is one big triangle facing the camera, tilted (its top 8 cm nearer)."""
    root = tmp_path_factory.mktemp('triangle')
    template = str(root / 'triangle.obj')
    obj_io.write_obj(template, np.array([[-0.18, -0.17, 0.04], [0.18, -0.17, 0.04], [0.0, 0.19, 0.12]], np.float32),
                     np.array([[0, 1, 2]]))
    return th.make_dataset(str(root / 'data'), count=8, resolution=32, template=template)


def surface_options(G, data, batch_size=4):
    return metric_utils.MetricOptions(G=G, dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=data),
                                      batch_size=batch_size)


def test_an_opaque_surface_on_the_mesh(triangle_data):
    # Density 50 per world unit behind the driving triangle, none in front of it.
    values = mesh_surface.compute_mesh_surface(surface_options(CoordinateG(50.0), triangle_data), num_gen=8, name='s')
    assert values['s_opacity'] > 0.999
    assert values['s_peak_density'] == pytest.approx(50.0, rel=1e-5)       # every face ray, just behind the surface
    assert values['s_depth_corr'] > 0.95


def test_a_fog_that_ignores_the_mesh(triangle_data):
    # Density 0.5 everywhere: opacity 1 - exp(-0.5 x the ray's length), on average over the sample jitter.
    values = mesh_surface.compute_mesh_surface(surface_options(CoordinateG(0.5, fog=True), triangle_data), num_gen=8, name='s')
    assert values['s_opacity'] == pytest.approx(1 - math.exp(-0.5 * RAY_LENGTH), abs=0.005)
    assert values['s_peak_density'] == pytest.approx(0.5, rel=1e-5)
    assert abs(values['s_depth_corr']) < 0.3


def test_mesh_surface_is_registered_and_repeats_exactly(triangle_data, monkeypatch):
    opts = dict(G=CoordinateG(0.5, fog=True), dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=triangle_data))
    torch.manual_seed(1)
    first = metric_main.calc_metric('mesh_surface_tiny', **opts).results
    torch.manual_seed(2)
    again = metric_main.calc_metric('mesh_surface_tiny', **opts).results
    assert sorted(first) == ['mesh_surface_tiny_depth_corr', 'mesh_surface_tiny_opacity', 'mesh_surface_tiny_peak_density']
    assert first == again
    monkeypatch.setattr(mesh_surface, 'RENDER_SEED', 1)                    # the renderer's random samples do matter
    assert metric_main.calc_metric('mesh_surface_tiny', **opts).results['mesh_surface_tiny_opacity'] != first['mesh_surface_tiny_opacity']


def test_mesh_surface_renders_as_the_generator_does():
    torch.manual_seed(0)
    G = configs.make_generator('tiny64').eval()
    head = load_head_model()
    verts, lms = head(jaw_pose=torch.tensor([[0.2, 0.0, 0.0]]))
    z, c, v = torch.randn(1, G.z_dim), frontal_label(yaw=1.3), torch.cat([verts, lms], dim=1)
    with torch.no_grad():
        _, _, _, depth, opacity = mesh_surface.render_rays(G, z, c, v, torch.Generator().manual_seed(3))
        expected = G(z, c, v, noise_mode='const', generator=torch.Generator().manual_seed(3))['image_depth']
    assert torch.equal(depth, expected)
    assert ((opacity > 0) & (opacity <= 1)).all()


def test_mesh_surface_of_an_untrained_next3d_repeats(tmp_path):
    data = th.make_dataset(str(tmp_path / 'head'), count=4, resolution=64, template=os.path.join(default_head_model_dir(), 'head_template.obj'))
    torch.manual_seed(0)
    opts = dict(G=configs.make_generator('tiny64'), dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=data),
                batch_size=2)
    first = mesh_surface.compute_mesh_surface(metric_utils.MetricOptions(**opts), num_gen=4, name='s')
    again = mesh_surface.compute_mesh_surface(metric_utils.MetricOptions(**opts), num_gen=4, name='s')
    assert first == again
    assert 0 < first['s_opacity'] < 1 and first['s_peak_density'] > 0 and -1 <= first['s_depth_corr'] <= 1


def test_mesh_surface_needs_a_tri_plane_generator(triangle_data):
    G = CoordinateG(1.0)
    del G.renderer
    with pytest.raises(ValueError, match='mesh_surface needs a tri-plane .Next3D. generator; CoordinateG has no renderer'):
        mesh_surface.compute_mesh_surface(surface_options(G, triangle_data), num_gen=4, name='s')
    with pytest.raises(ValueError, match='s needs a mesh-driven'):
        mesh_surface.compute_mesh_surface(surface_options(torch.nn.Linear(1, 1), triangle_data), num_gen=4, name='s')


# --- jaw_control ----------------------------------------------------------------------------------

NUM_VERTICES = 4977


def inner_lip_opening(v: torch.Tensor) -> torch.Tensor:
    """Conditions (B, V + 68, 3) -> (B,) distance of the inner-lip landmarks 62 and 66 (metres)."""
    lms = v[:, -68:]
    return (lms[:, 62] - lms[:, 66]).norm(dim=-1)


class PainterG(torch.nn.Module):
    """Stand-in for a 64 px head generator. 'lower' / 'upper' / 'everywhere': rows 32-63 / 0-31 / all are
    10 x the inner-lip opening (metres), the rest 0. 'ignore': the image is the renderer's random numbers plus z, whatever the mesh."""

    def __init__(self, mode: str, num_vertices: int = NUM_VERTICES):
        super().__init__()
        self.mode, self.num_vertices = mode, num_vertices
        self.z_dim, self.c_dim, self.img_resolution, self.rendering_kwargs = 4, 25, 64, {}

    def forward(self, z, c, v, truncation_psi=1, noise_mode='random', generator=None):
        image = torch.zeros(len(z), 3, 64, 64)
        if self.mode == 'ignore':
            image = torch.rand(image.shape, generator=generator) + z[:, :1, None, None]
        else:
            rows = dict(lower=slice(32, 64), upper=slice(0, 32), everywhere=slice(0, 64))[self.mode]
            image[:, :, rows] = 10 * inner_lip_opening(v)[:, None, None, None]
        return dict(image=image)


@pytest.fixture(scope='module')
def jaw_opening():
    """The head model's inner-lip opening with jaw 0.3 minus with jaw 0 (metres), computed here."""
    verts, lms = load_head_model()(jaw_pose=torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]]))
    opening = inner_lip_opening(torch.cat([verts, lms], dim=1))
    return float(opening[1] - opening[0])


def jaw_metric(G):
    return metric_main.calc_metric('jaw_control', G=G).results


def test_jaw_boxes_at_64_px_are_the_diagnosis_boxes():
    # pretrained_models/README.md measured these with its own script: mouth rows 43-57, columns 24-38; forehead rows 6-20.
    mouth, forehead = jaw_control.jaw_boxes(load_head_model(), frontal_label(), 64)
    assert (mouth[0].start, mouth[0].stop, mouth[1].start, mouth[1].stop) == (43, 58, 24, 39)
    assert (forehead[0].start, forehead[0].stop) == (6, 21)
    assert forehead[1].stop - forehead[1].start == 15


def test_a_mouth_that_opens_with_the_jaw(jaw_opening):
    values = jaw_metric(PainterG('lower'))
    assert jaw_opening > 0.02
    assert values['jaw_control_mouth'] == pytest.approx(10 * jaw_opening, rel=1e-5)
    assert values['jaw_control_forehead'] == 0
    assert values['jaw_control_ratio'] == pytest.approx(10 * jaw_opening / jaw_control.RATIO_FLOOR, rel=1e-5)
    assert values['jaw_control_lip_corr'] == pytest.approx(1, abs=1e-6)      # the change is 10 x (opening - the closest)


def test_changes_off_the_mouth(jaw_opening):
    values = jaw_metric(PainterG('upper'))
    assert values['jaw_control_mouth'] == 0 and values['jaw_control_ratio'] == 0 and values['jaw_control_lip_corr'] == 0
    assert values['jaw_control_forehead'] == pytest.approx(10 * jaw_opening, rel=1e-5)
    values = jaw_metric(PainterG('everywhere'))
    assert values['jaw_control_mouth'] == pytest.approx(10 * jaw_opening, rel=1e-5)
    assert values['jaw_control_ratio'] == pytest.approx(1, rel=1e-6)


def test_a_generator_that_ignores_the_mesh():
    # Its images are random: only identical renderer random numbers for both meshes give zero change.
    values = jaw_metric(PainterG('ignore'))
    assert values == dict(jaw_control_mouth=0, jaw_control_forehead=0, jaw_control_ratio=0, jaw_control_lip_corr=0)


def test_jaw_control_of_an_untrained_next3d_repeats():
    torch.manual_seed(0)
    G = configs.make_generator('tiny64')
    opts = metric_utils.MetricOptions(G=G)
    first = jaw_control.compute_jaw_control(opts, 'j', num_seeds=2, num_frames=3)
    torch.rand(10)
    again = jaw_control.compute_jaw_control(opts, 'j', num_seeds=2, num_frames=3)
    assert first == again
    assert first['j_mouth'] > 0 and first['j_forehead'] >= 0


def test_jaw_control_needs_the_head_models_mesh():
    with pytest.raises(ValueError, match=r"jaw_control needs a generator driven by the bundled head model's mesh \(4977 vertices\); this one takes 12"):
        jaw_metric(PainterG('lower', num_vertices=12))


def test_jaw_control_renders_each_mesh_once():
    # 8 seeds in one batch: the two head-model meshes and the 32 driving frames, the most closed one included.
    G = PainterG('lower')
    calls = []
    forward = G.forward
    G.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    values = jaw_control.compute_jaw_control(metric_utils.MetricOptions(G=G), 'j', num_seeds=8)
    assert len(calls) == 2 + 32
    assert values['j_lip_corr'] == pytest.approx(1, abs=1e-6)
