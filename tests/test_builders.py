"""Nothing read from a file chooses what runs: class names in snapshots, official pickles
and run options resolve through fixed tables (training/builders.py) only."""

import os
import pickle

import pytest
import torch
from click.testing import CliRunner

import calc_metrics
import legacy
from tests import train_helpers as th
from torch_utils import persistence
from training import builders
from training.dataset import MeshImageDataset


@pytest.fixture
def victim(tmp_path):
    """A folder a payload would delete, a module and a hub repo that would write a marker if ever imported."""
    folder = tmp_path / 'precious'
    folder.mkdir()
    (folder / 'keep.txt').write_text('data')
    marker = tmp_path / 'PWNED'
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\ndef model():\n    return 0\n"
    (tmp_path / 'evil.py').write_text(code)
    hub = tmp_path / 'hub'
    hub.mkdir()
    (hub / 'hubconf.py').write_text(code)
    return dict(folder=folder, marker=marker, module=tmp_path / 'evil.py', hub=hub)


def payloads(v) -> list:
    """training_set_kwargs that ran code before the fixed table existed."""
    return [
        dict(class_name='shutil.rmtree', path=str(v['folder'])),
        dict(class_name='pydoc.importfile', path=str(v['module'])),
        dict(class_name='torch.hub.load', repo_or_dir=str(v['hub']), model='model', source='local', path='x'),
        dict(class_name='training.dataset_x.MeshImageDataset', path=str(v['folder'])),
        dict(class_name='training.configs.make_generator', path=str(v['folder'])),     # ours, but not a dataset
    ]


def untouched(v) -> bool:
    return (v['folder'] / 'keep.txt').is_file() and not v['marker'].exists()


def test_open_dataset_refuses_every_payload_before_calling_anything(victim):
    for kwargs in payloads(victim):
        with pytest.raises(builders.ConfigError, match=r"^net\.pkl: training_set_kwargs: dataset class .* is not one this project builds"):
            builders.open_dataset(kwargs, source='net.pkl')
        assert untouched(victim), kwargs['class_name']


def test_calc_metrics_refuses_payloads_in_our_snapshot_and_in_an_official_pickle(victim, tmp_path):
    G = builders.build('network', th.tiny_G_kwargs())
    for i, kwargs in enumerate(payloads(victim)):
        ours = tmp_path / f'ours{i}.pkl'
        persistence.save_checkpoint(str(ours), dict(G=G, D=None, G_ema=G, training_set_kwargs=kwargs))
        official = tmp_path / f'official{i}.pkl'
        official.write_bytes(pickle.dumps(dict(training_set_kwargs=kwargs, G=None, D=None, G_ema=None, augment_pipe=None), protocol=4))
        for path in (ours, official):
            result = CliRunner().invoke(calc_metrics.main, ['--network', str(path), '--metrics', 'mesh_depth_err'])
            assert result.exit_code == 1, result.output
            assert result.output.startswith(f'Error: {path}: training_set_kwargs: dataset class {kwargs["class_name"]!r} is not one')
            assert 'Traceback' not in result.output
            assert untouched(victim)


def test_check_dataset_kwargs_types_and_keys():
    ok = builders.check_dataset_kwargs(dict(class_name='training_avatar_texture.dataset.ImageFolderDataset', path='d', mesh_path='m',
                                            use_labels=True, max_size=None, xflip=False, load_exp=True, load_lms=True,
                                            resolution=512, random_seed=0), source='f')
    assert ok == dict(class_name='training.dataset.MeshImageDataset', path='d', mesh_path='m', use_labels=True, max_size=None,
                      xflip=False, load_lms=True, resolution=512, random_seed=0)        # official load_exp dropped
    bad = [
        (dict(path='d', xflip='yes'), r"training_set_kwargs\.xflip must be bool, found str"),
        (dict(path='d', resolution=1e12), r"training_set_kwargs\.resolution must be int or null, found float"),
        (dict(path='d', max_size=True), r"training_set_kwargs\.max_size must be int or null, found bool"),
        (dict(path=['a']), r"training_set_kwargs\.path must be str"),
        (dict(path='d', open=print), r"unknown key 'open'"),
        (dict(path='d', load_exp=True), r"unknown key 'load_exp'"),         # only official names carry it
        (dict(path='d', validate='all'), r"validate must be one of auto, full, first"),
        (dict(path='d', resolution=-2), r"resolution must be positive"),
        (dict(), r"names no dataset path"),
        ([('path', 'd')], r"training_set_kwargs must be a dict"),
    ]
    for kwargs, message in bad:
        with pytest.raises(builders.ConfigError, match='^f: .*' + message):
            builders.check_dataset_kwargs(kwargs, source='f')


def test_build_uses_fixed_tables_only(victim):
    G = builders.build('network', th.tiny_G_kwargs())
    assert type(G).__name__ == 'EG3DGenerator'
    opt = builders.build('optimizer', dict(class_name='torch.optim.Adam', lr=0.1), G.parameters())
    assert isinstance(opt, torch.optim.Adam) and opt.defaults['lr'] == 0.1
    assert builders.lookup('dataset', 'training.dataset.ImageFolderDataset') is MeshImageDataset       # EG3D's name
    for kind, name in [('optimizer', 'torch.optim.SGD'), ('network', 'torch.nn.Linear'), ('augment', 'os.system'),
                       ('network', 'shutil.rmtree'), ('optimizer', None)]:
        with pytest.raises(builders.ConfigError, match=f"^run.json: {kind} class {name!r} is not one this project builds"):
            builders.build(kind, dict(class_name=name, path=str(victim['folder'])), source='run.json')
    assert untouched(victim)


def test_no_dotted_name_lookup_left_in_the_code():
    """dnnlib's call-anything-by-name helpers are gone; no module imports a class by a string."""
    import dnnlib
    assert not hasattr(dnnlib, 'construct_class_by_name') and not hasattr(dnnlib, 'get_obj_by_name')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder, _dirs, files in os.walk(root):
        if any(part.startswith('.') or part == 'tests' for part in os.path.relpath(folder, root).split(os.sep)):
            continue
        for name in files:
            if name.endswith('.py'):
                text = open(os.path.join(folder, name), encoding='utf-8').read()
                for needle in ('def construct_class_by_name', 'def get_obj_by_name', 'dnnlib.construct_class_by_name',
                               'dnnlib.get_obj_by_name'):
                    assert needle not in text, f'{name} has {needle}'    # (benchmarks may call the original code's own)


def test_legacy_is_a_thin_alias_and_the_library_does_not_import_scripts():
    from training import network_pickle
    assert legacy.load_network_pkl is network_pickle.load_network_pkl
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = {n[:-3] for n in os.listdir(root) if n.endswith('.py')}
    for package in ('training', 'torch_utils', 'metrics', 'dnnlib'):
        for folder, _dirs, files in os.walk(os.path.join(root, package)):
            for name in files:
                if not name.endswith('.py'):
                    continue
                for line in open(os.path.join(folder, name), encoding='utf-8'):
                    words = line.split()
                    if words[:1] in (['import'], ['from']) and len(words) > 1:
                        assert words[1].split('.')[0] not in scripts, f'{package}/{name} imports script {words[1]}'
