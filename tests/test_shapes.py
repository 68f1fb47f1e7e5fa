"""Shape export: surface levels, closed meshes in every format, missing packages, the time estimate."""

import math
import sys
import types

import mrcfile
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gen_samples
from training import coords, shapes
from training.mesh.obj_io import read_obj
from training.volumetric_rendering.ray_sampler import RaySampler

trimesh = pytest.importorskip('trimesh')
pytest.importorskip('skimage')

FAKE_G = types.SimpleNamespace(rendering_kwargs=dict(box_warp=1.0))


def cone_density(peak: float, radius: float):
    """sigma = peak at the origin, falling linearly to 0 at `radius`: the level-L surface is a sphere of radius (1 - L / peak) * radius."""
    def make(G, ws, v):
        def sigma_fn(points):
            calls.append(points.shape[1])
            return peak * (1 - points.norm(dim=-1, keepdim=True) / radius)
        return sigma_fn
    calls = []
    return make, calls


def test_surface_level_automatic_and_requested():
    assert shapes.surface_level(35.0) == 10.0                  # EG3D's level when the peak is high
    assert shapes.surface_level(20.0) == 10.0
    assert shapes.surface_level(7.922) == pytest.approx(3.961)  # a soft model: half its maximum
    assert shapes.surface_level(12.4, 10.0) == 10.0            # an explicit level is kept
    with pytest.raises(ValueError, match=r'never exceeds level 10 \(its maximum is 9.96\)'):
        shapes.surface_level(9.96, 10.0)
    with pytest.raises(ValueError, match='never exceeds'):
        shapes.surface_level(-2.0)
    # What 90% of the frontal view's central rays reach lowers the automatic level, never a requested one.
    assert shapes.surface_level(35.0, None, 4.5) == 4.5
    assert shapes.surface_level(35.0, None, 12.0) == 10.0
    assert shapes.surface_level(8.0, None, 6.0) == 4.0
    assert shapes.surface_level(35.0, None, 0.0) == 10.0 and shapes.surface_level(35.0, None, -math.inf) == 10.0   # no surface in front
    assert shapes.surface_level(35.0, 8.0, 4.5) == 8.0


def frontal_rays(resolution: int = 32):
    c = coords.make_label(coords.cam2world_look_at(torch.tensor([math.pi / 2]), torch.tensor([math.pi / 2])))
    return gen_samples.frontal_central_rays(types.SimpleNamespace(ray_sampler=RaySampler()), c, resolution), c


def test_front_reach_of_a_cone():
    """Peak 20 at the origin, falling linearly to 0 at 0.4: a ray's maximum is 20 (1 - d / 0.4), d its distance to the origin."""
    (origins, directions), _ = frontal_rays()
    assert origins.shape == directions.shape == (1, 16 * 16, 3)
    sigma_fn = cone_density(peak=20.0, radius=0.4)[0](None, None, None)
    distance = torch.linalg.cross(origins[0], directions[0], dim=-1).norm(dim=-1)      # origin to the line
    expected = np.sort((20 * (1 - distance / 0.4)).numpy())
    reach = shapes.front_reach(sigma_fn, origins, directions, samples=256)
    assert reach == pytest.approx(expected[int(0.1 * (len(expected) - 1))], abs=0.1)
    assert 5 < reach < expected.max() - 5                               # the outer central rays pass far from the peak
    assert shapes.front_reach(sigma_fn, origins, directions, box_warp=0.1) < reach     # points outside the box are left out
    assert shapes.front_reach(sigma_fn, origins + 10, directions) == -math.inf          # rays that miss the box


def test_automatic_level_closes_the_front(tmp_path, monkeypatch, capsys):
    """A cone of peak 20 and radius 0.3: half its maximum (10) cuts out a sphere of radius 0.15 that fewer than 90%
    of the central rays hit; the level 90% reach is lower (7.6), and its sphere larger."""
    density, _ = cone_density(peak=20.0, radius=0.3)
    monkeypatch.setattr(gen_samples, 'density_function', density)
    _, c = frontal_rays()
    G = types.SimpleNamespace(rendering_kwargs=dict(box_warp=1.0), ray_sampler=RaySampler())
    gen_samples.export_shape(G, None, None, 33, None, str(tmp_path / 'a.ply'), torch.device('cpu'), c)
    out = capsys.readouterr().out
    level = float(out.split('a.ply: level ')[1].split()[0])
    assert level == pytest.approx(7.63, abs=0.1) and "(auto: reached by 90% of the frontal view's central rays, below EG3D's 10; density maximum 20)" in out
    radius = np.linalg.norm(trimesh.load(str(tmp_path / 'a.ply')).vertices, axis=1).mean()
    assert radius == pytest.approx(0.3 * (1 - level / 20), abs=0.01) and radius > 0.17
    gen_samples.export_shape(G, None, None, 33, None, str(tmp_path / 'a.mrc'), torch.device('cpu'), c)
    assert f"view it at level {level:.4g} (auto: reached by 90%" in capsys.readouterr().out


@pytest.mark.parametrize('shape_format', ['.ply', '.obj'])
def test_mesh_formats_are_closed_and_read_back(tmp_path, monkeypatch, capsys, shape_format):
    # Peak 8 < 20: the automatic level is 4, a sphere of radius 0.2 (33 samples per axis include the origin).
    density, _ = cone_density(peak=8.0, radius=0.4)
    monkeypatch.setattr(gen_samples, 'density_function', density)
    path = tmp_path / f'seed0001{shape_format}'
    gen_samples.export_shape(FAKE_G, None, None, 33, None, str(path), torch.device('cpu'))
    out = capsys.readouterr().out
    assert "level 4 (auto: half the density maximum 8; EG3D's 10 from a maximum of 20)" in out
    if shape_format == '.obj':
        obj = read_obj(str(path))
        mesh = trimesh.Trimesh(obj.v, obj.f, process=False)
    else:
        mesh = trimesh.load(str(path), process=False)
    assert len(mesh.vertices) > 100 and f'{len(mesh.vertices):,} vertices' in out
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0   # closed, normals outwards
    assert abs(np.linalg.norm(mesh.vertices, axis=1).mean() - 0.2) < 0.005


def test_surface_meeting_the_box_is_capped():
    # Dense below the plane z = 0.1: the raw surface would be an open sheet; capped, it is a closed slab.
    n = 24
    g = shapes.grid_coordinates(n).numpy()
    volume = (10 + 50 * (0.1 - g[:, 2])).reshape(n, n, n).astype(np.float32)
    verts, faces = shapes.volume_to_mesh(volume, level=10.0)
    mesh = trimesh.Trimesh(verts, faces, process=True)     # merged vertices: still closed, no zero-area faces
    assert mesh.is_watertight and mesh.nondegenerate_faces().all()
    assert mesh.volume == pytest.approx(1.0 * 1.0 * 0.6, abs=1e-4)    # the box below z = 0.1
    assert np.abs(verts).max() == pytest.approx(0.5, abs=1e-5)


def test_mrc_written_with_a_viewing_level(tmp_path, monkeypatch, capsys):
    density, _ = cone_density(peak=8.0, radius=0.4)
    monkeypatch.setattr(gen_samples, 'density_function', density)
    path = tmp_path / 'seed0000.mrc'
    gen_samples.export_shape(FAKE_G, None, None, 33, None, str(path), torch.device('cpu'))
    with mrcfile.open(str(path)) as mrc:
        assert mrc.data.shape == (33, 33, 33) and mrc.data.max() == pytest.approx(8.0)
    assert 'density -9.321 .. 8; view it at level 4 (auto: half the density maximum 8;' in capsys.readouterr().out


def test_requested_level_not_reached_fails_before_the_full_grid(tmp_path, monkeypatch):
    density, calls = cone_density(peak=8.0, radius=0.4)
    monkeypatch.setattr(gen_samples, 'density_function', density)
    monkeypatch.setattr(gen_samples, 'PREVIEW_RES', 16)
    path = tmp_path / 'seed0002.ply'
    with pytest.raises(gen_samples.click.ClickException) as info:
        gen_samples.export_shape(FAKE_G, None, None, 64, 10.0, str(path), torch.device('cpu'))
    assert info.value.message == (f'{path}: the density never exceeds level 10 (its maximum is 6.845) on a 16^3 grid: '
                                  'no surface; --shape-level=auto picks a level below the maximum')
    assert sum(calls) == 16 ** 3 and not path.exists()


def test_estimate_is_printed_before_the_full_grid(tmp_path, monkeypatch, capsys):
    density, calls = cone_density(peak=30.0, radius=0.4)
    monkeypatch.setattr(gen_samples, 'density_function', density)
    monkeypatch.setattr(gen_samples, 'PREVIEW_RES', 16)
    gen_samples.export_shape(FAKE_G, None, None, 32, None, str(tmp_path / 's.ply'), torch.device('cpu'))
    out = capsys.readouterr().out
    assert "s.ply: level 10 (auto: EG3D's; density maximum" in out
    assert 's.ply: 32^3 = 32,768 density samples, about ' in out and ' s (timed on the 16^3 grid)' in out
    assert sum(calls) == 16 ** 3 + 32 ** 3


@pytest.mark.parametrize('shape_format, module, package', [('.ply', 'skimage.measure', 'scikit-image'),
                                                           ('.obj', 'skimage.measure', 'scikit-image'),
                                                           ('.mrc', 'mrcfile', 'mrcfile')])
def test_missing_package_is_reported_before_loading_the_network(tmp_path, monkeypatch, shape_format, module, package):
    monkeypatch.setitem(sys.modules, module, None)      # makes `import module` raise ImportError
    result = CliRunner().invoke(gen_samples.generate_images, ['--network', str(tmp_path / 'missing.pkl'), '--outdir', str(tmp_path),
                                                              '--shapes', 'true', '--shape-format', shape_format])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: {shape_format} shapes need {package}: pip install -e '.[shapes]'"


@pytest.mark.parametrize('args, message', [
    (['--shape-level', '5'], '--shape-level applies to .ply/.obj surfaces'),
    (['--shape-format', '.ply', '--shape-level', 'ten'], "'ten': expected a finite number or auto"),
    (['--shape-format', '.ply', '--shape-level', 'nan'], "'nan': expected a finite number or auto"),
])
def test_bad_shape_level_options(tmp_path, args, message):
    result = CliRunner().invoke(gen_samples.generate_images, ['--network', str(tmp_path / 'missing.pkl'), '--outdir', str(tmp_path),
                                                              '--shapes', 'true', *args])
    assert result.exit_code == 2 and message in result.output
