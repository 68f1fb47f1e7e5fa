"""The bundled model shows what the method claims (pretrained_models/README.md), on held-out data:
geometry that follows the mesh, a mouth that follows the jaw, a closed head surface per demo seed.

Held out: 32 synthetic items of seed 1 (the model was trained on seed 0's identities).
A model without these properties (e.g. the first, 5-kimg placeholder: depth error 0.155
against 0.088 at kimg 0, jaw control 0.048) fails here.
"""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gen_samples
from dataset_preprocessing.synthetic import make_dataset
from metrics import metric_main
from training import builders, configs, coords
from training.generation import load_network
from training.mesh.obj_io import read_obj_vertices

ROOT = configs.REPO_ROOT
BUNDLED = os.path.join(ROOT, 'pretrained_models', 'next3d-synthetic64.pkl')
OPTIONS = os.path.join(ROOT, 'pretrained_models', 'training_options.json')


@pytest.fixture(scope='module')
def held_out(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('held_out') / 'data')
    make_dataset.make_training_set(root, count=32, resolution=64, seed=1, workers=1, expression_labels=True)
    return root


@pytest.fixture(scope='module')
def bundled():
    return load_network(BUNDLED, torch.device('cpu')).G_ema


def metric(name, G, data):
    kwargs = dict(G=G, dataset_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=data, use_labels=True,
                                           load_lms=True, resolution=64))
    return metric_main.calc_metric(name, **kwargs).results


def test_bundled_geometry_follows_the_mesh(bundled, held_out):
    """mesh_depth_err at most half of a freshly initialised generator's (seed 0, the run's options; the run's own
    kimg-0 value was 0.0878 on the training data), the rendered depth correlated with the mesh's."""
    with open(OPTIONS) as f:
        G_kwargs = json.load(f)['G_kwargs']
    torch.manual_seed(0)
    fresh = builders.build('network', G_kwargs).eval()
    start = metric('mesh_depth_err_tiny', fresh, held_out)['mesh_depth_err_tiny']
    err = metric('mesh_depth_err_tiny', bundled, held_out)['mesh_depth_err_tiny']
    assert err <= 0.5 * start, (err, start)
    surface = metric('mesh_surface_tiny', bundled, held_out)
    assert surface['mesh_surface_tiny_depth_corr'] > 0.5 and surface['mesh_surface_tiny_opacity'] > 0.6, surface


def test_bundled_mouth_follows_the_jaw(bundled):
    """Issue 18's expression control: jaw 0 vs 0.3 rad changes the mouth box by >= 0.2, >= 10x the forehead's."""
    values = metric_main.calc_metric('jaw_control', G=bundled).results
    assert values['jaw_control_mouth'] >= 0.2 and values['jaw_control_ratio'] >= 10, values


def test_bundled_demo_seeds_have_closed_head_surfaces(tmp_path):
    """gen_samples --shapes at the automatic level: per demo seed, the closed piece of surface at the face is
    in front where the mesh's face is and about as wide and tall as the mesh in front of z = 0.05 (0.36 x 0.58
    world units), not islands (the 129-kimg snapshot at level ~10: pieces of 0.04-0.22 x 0.04-0.48 for seeds 0 and 2)."""
    pytest.importorskip('skimage')
    trimesh = pytest.importorskip('trimesh')
    result = CliRunner().invoke(gen_samples.generate_images, ['--network', BUNDLED, '--seeds', '0-3', '--trunc', '0.7', '--outdir', str(tmp_path),
                                                              '--shapes', 'true', '--shape-res', '64', '--shape-format', '.ply'])
    assert result.exit_code == 0, result.output
    head = coords.mesh_to_world(torch.from_numpy(read_obj_vertices(configs.BUNDLED_TEMPLATE))).numpy()
    front = head[centre_column(head), 2].max()          # the driving mesh's face, world units
    for seed in range(4):
        mesh = trimesh.load(str(tmp_path / f'seed{seed:04d}.ply'))
        assert mesh.is_watertight, seed
        face = max(mesh.split(only_watertight=False), key=lambda part: front_of_face(part.vertices))
        assert face.is_watertight and abs(front_of_face(face.vertices) - front) < 0.06, (seed, front, front_of_face(face.vertices))
        assert face.extents[0] > 0.3 and face.extents[1] > 0.45, (seed, face.extents)


def centre_column(points: np.ndarray) -> np.ndarray:
    """Points within 0.03 of the frontal view's centre line (x = 0, y in [-0.05, 0.05]): nose and lips of the head."""
    return (np.abs(points[:, 0]) < 0.03) & (np.abs(points[:, 1]) < 0.05)


def front_of_face(points: np.ndarray) -> float:
    """The largest z of the points on the centre line (-inf if none)."""
    column = points[centre_column(points)]
    return float(column[:, 2].max()) if len(column) else -np.inf
