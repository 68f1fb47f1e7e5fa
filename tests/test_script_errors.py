"""User mistakes in the command-line scripts: one `Error: ...` line that names the file or
option, never a traceback, checked before any work, and no output left behind."""

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import calc_metrics
import dataset_tool
import demo
import gen_samples
import gen_videos
import reenact_avatar
import train
from dataset_preprocessing import preprocess_in_the_wild
from dataset_preprocessing.synthetic import make_dataset
from tests import train_helpers as th
from torch_utils import persistence
from training.configs import BUNDLED_TEMPLATE, make_generator
from training.dataset import DatasetError
from training.driving import DEFAULT_LMS, DEFAULT_OBJ
from training.mesh.obj_io import read_obj_vertices, write_obj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_NETWORK = os.path.join(ROOT, 'pretrained_models', 'next3d-synthetic64.pkl')
BUNDLED_DRIVING = os.path.join(ROOT, 'data', 'driving')
TEMPLATE = os.path.join(ROOT, 'data', 'head_model', 'head_template.obj')
GENERATORS = {'samples': gen_samples.generate_images, 'videos': gen_videos.generate_videos, 'reenact': reenact_avatar.reenact}


@pytest.fixture(scope='module')
def tiny_network(tmp_path_factory):
    G = make_generator('tiny64').eval()
    path = tmp_path_factory.mktemp('net') / 'tiny.pkl'
    persistence.save_checkpoint(str(path), dict(G=G, G_ema=G, D=None, training_set_kwargs={}))
    return str(path)


@pytest.fixture(scope='module')
def truncated_network(tmp_path_factory):
    with open(BUNDLED_NETWORK, 'rb') as f:
        data = f.read()
    path = tmp_path_factory.mktemp('net') / 'truncated.pkl'
    path.write_bytes(data[:len(data) // 2])
    return str(path)


def error_line(result) -> str:
    """The one `Error: ...` line of a refused command; fails on a traceback or a success."""
    assert isinstance(result.exception, SystemExit) and result.exit_code in (1, 2), result.output + repr(result.exception)
    assert 'Traceback' not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1, result.output
    return lines[0]


def refuse(command, args) -> str:
    return error_line(CliRunner().invoke(command, [str(a) for a in args]))


def generator_args(script: str, network: str, outdir) -> list:
    extra = ['--drive_root', BUNDLED_DRIVING] if script == 'reenact' else []
    return [*extra, '--network', network, '--seeds', '0', '--outdir', outdir]


# ----------------------------------------------------------------------------------------
# Networks

@pytest.mark.parametrize('script', sorted(GENERATORS))
def test_missing_network_names_the_file_and_creates_nothing(script, tmp_path):
    missing, out = tmp_path / 'missing.pkl', tmp_path / 'out'
    assert refuse(GENERATORS[script], generator_args(script, missing, out)) == f'Error: {missing}: no such network file'
    assert not out.exists()


@pytest.mark.parametrize('script', sorted(GENERATORS))
def test_truncated_network_names_the_file(script, truncated_network, tmp_path):
    line = refuse(GENERATORS[script], generator_args(script, truncated_network, tmp_path / 'out'))
    assert line.startswith(f'Error: {truncated_network}: truncated or corrupt checkpoint')
    assert not (tmp_path / 'out').exists()


def test_calc_metrics_truncated_network(truncated_network):
    line = refuse(calc_metrics.main, ['--network', truncated_network, '--metrics', 'mesh_depth_err_tiny'])
    assert line.startswith(f'Error: {truncated_network}: truncated or corrupt checkpoint')


def test_demo_missing_network(tmp_path):
    missing = tmp_path / 'missing.pkl'
    line = refuse(demo.main, ['--network', missing, '--outdir', tmp_path / 'out'])
    assert line.startswith(f'Error: {missing}: no such network file')
    assert not (tmp_path / 'out').exists()


def test_demo_depth_grid_is_the_same_every_run(tmp_path):
    """The depth pictures draw the renderer's samples from a generator seeded by the seed
    (the global one made depth.png differ from run to run)."""
    paths = [str(tmp_path / f'depth{k}.png') for k in range(2)]
    demo.save_depth_grid(os.path.join(demo.ROOT, demo.NETWORK), [0, 1], paths[0])
    torch.rand(5)                                                # move the global generator on
    demo.save_depth_grid(os.path.join(demo.ROOT, demo.NETWORK), [0, 1], paths[1])
    first, second = (np.asarray(PIL.Image.open(p)) for p in paths)
    assert first.shape[1] == 2 * first.shape[0] and first.std() > 0
    assert np.array_equal(first, second)


def test_demo_failed_step_is_one_line(tmp_path, monkeypatch):
    def failing_run(args, **kwargs):
        raise subprocess.CalledProcessError(1, args)
    monkeypatch.setattr(demo.subprocess, 'run', failing_run)
    line = refuse(demo.main, ['--outdir', tmp_path / 'out'])
    assert line.startswith('Error: python gen_samples.py ') and line.endswith('failed with exit status 1 (its error is above)')


def test_console_shows_no_traceback(truncated_network, tmp_path):
    """The real console: stderr of the script process ends with the one error line."""
    proc = subprocess.run([sys.executable, 'gen_samples.py', '--network', truncated_network, '--seeds', '0',
                           '--outdir', str(tmp_path / 'out')], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f'Error: {truncated_network}: truncated or corrupt checkpoint')


# ----------------------------------------------------------------------------------------
# Options checked by the parser

@pytest.mark.parametrize('script', sorted(GENERATORS))
@pytest.mark.parametrize('seeds, bad', [('-5', -5), ('4294967296', 4294967296), ('0,4294967290-4294967296', 4294967296)])
def test_seeds_outside_the_random_state_range_are_usage_errors(script, seeds, bad, tiny_network, tmp_path):
    args = generator_args(script, tiny_network, tmp_path / 'out')
    args[args.index('--seeds') + 1] = seeds
    assert refuse(GENERATORS[script], args) == f"Error: Invalid value for '--seeds': seed {bad} is outside [0, 2**32)"


@pytest.mark.parametrize('script', sorted(GENERATORS))
@pytest.mark.parametrize('value', ['nan', 'inf', '-inf'])
def test_trunc_must_be_finite(script, value, tiny_network, tmp_path):
    line = refuse(GENERATORS[script], generator_args(script, tiny_network, tmp_path / 'out') + ['--trunc', value])
    assert line == f"Error: Invalid value for '--trunc': {float(value)} is not a finite number"


@pytest.mark.parametrize('command, args', [
    (gen_samples.generate_images, ['--network', BUNDLED_NETWORK]),
    (gen_videos.generate_videos, ['--network', BUNDLED_NETWORK]),
    (reenact_avatar.reenact, ['--network', BUNDLED_NETWORK, '--drive_root', BUNDLED_DRIVING]),
    (demo.main, []),
    (make_dataset.main, ['--count', '1']),
    (preprocess_in_the_wild.main, ['--indir', BUNDLED_DRIVING]),
], ids=['gen_samples', 'gen_videos', 'reenact', 'demo', 'make_dataset', 'preprocess'])
def test_outdir_that_is_a_file_is_refused_before_any_work(command, args, tmp_path):
    afile = tmp_path / 'afile'
    afile.write_text('keep me')
    result = CliRunner().invoke(command, args + ['--outdir', str(afile)])
    assert error_line(result) == f"Error: Invalid value for '--outdir': Directory {str(afile)!r} is a file."
    assert result.exit_code == 2 and 'Loading' not in result.output and afile.read_text() == 'keep me'


def test_dataset_tool_dest_that_is_a_folder(tmp_path):
    line = refuse(dataset_tool.main, ['--source', tmp_path / 'nothing', '--dest', tmp_path])
    assert line == f"Error: Invalid value for '--dest': File {str(tmp_path)!r} is a directory."


# ----------------------------------------------------------------------------------------
# Driving folders

def _set_label(root, index, entry):
    data = json.loads((root / 'dataset.json').read_text())
    data['labels'][index] = entry
    (root / 'dataset.json').write_text(json.dumps(data))


@pytest.mark.parametrize('case', ['no folder', 'no dataset.json', 'frame without obj', 'label of 24 numbers',
                                  'label of text', 'entry not a pair', 'frame outside the folder', 'obj with bad faces'])
def test_driving_folder_problems_name_the_file(case, tiny_network, tmp_path):
    root = tmp_path / 'drive'
    if case != 'no folder':
        shutil.copytree(BUNDLED_DRIVING, root)
    js = root / 'dataset.json'
    c = json.loads(js.read_text())['labels'][1][1] if js.exists() else None
    if case == 'no dataset.json':
        js.unlink()
    elif case == 'frame without obj':
        (root / 'frame00001.obj').unlink()
    elif case == 'label of 24 numbers':
        _set_label(root, 1, ['frame00001.png', c[:24]])
    elif case == 'label of text':
        _set_label(root, 1, ['frame00001.png', ['x'] * 25])
    elif case == 'entry not a pair':
        _set_label(root, 1, 'frame00001.png')
    elif case == 'frame outside the folder':
        _set_label(root, 1, ['../frame00001.png', c])
    elif case == 'obj with bad faces':
        with open(root / 'frame00001.obj', 'a') as f:
            f.write('f 1 2 99999\n')
    expected = {
        'no folder': f'{root}: driving folder does not exist',
        'no dataset.json': f'{js}: a driving folder needs dataset.json with a camera label per frame',
        'frame without obj': f'{root / "frame00001.obj"}: missing (listed as frame frame00001.png in {js})',
        'label of 24 numbers': f'{js}: label of frame00001.png is not 25 finite numbers',
        'label of text': f'{js}: label of frame00001.png is not 25 finite numbers',
        'entry not a pair': f'{js}: entry 2 is not [frame file, [25 numbers]]',
        'frame outside the folder': f'{js}: frame ../frame00001.png is not a path inside the driving folder',
        'obj with bad faces': f'{root / "frame00001.obj"}: face 1 uses vertex 99999 but the file has 4977 vertices',
    }[case]
    out = tmp_path / 'out'
    assert refuse(reenact_avatar.reenact, ['--drive_root', root, '--network', tiny_network, '--outdir', out]) == f'Error: {expected}'
    assert not out.exists()


# ----------------------------------------------------------------------------------------
# Meshes whose faces use vertices that do not exist

def test_obj_path_with_bad_faces_is_refused_before_loading(tmp_path):
    bad = tmp_path / 'bad.obj'
    write_obj(bad, read_obj_vertices(DEFAULT_OBJ))
    with open(bad, 'a') as f:
        f.write('f 1 2 3\nf 1 2 99999\n')
    result = CliRunner().invoke(gen_samples.generate_images, ['--network', BUNDLED_NETWORK, '--outdir', str(tmp_path / 'out'),
                                                              '--obj_path', str(bad), '--lms_path', DEFAULT_LMS])
    assert error_line(result) == f'Error: {bad}: face 2 uses vertex 99999 but the file has 4977 vertices'
    assert 'Loading networks' not in result.output and not (tmp_path / 'out').exists()


def test_train_topology_with_bad_faces(tmp_path):
    data = th.make_dataset(str(tmp_path / 'data'), count=2, resolution=64, template=TEMPLATE)
    text = open(TEMPLATE).read()
    first_face = text.index('\nf ') + 1
    line_end = text.index('\n', first_face)
    bad = tmp_path / 'template.obj'
    bad.write_text(text[:first_face] + 'f 1/1 2/2 99999/3' + text[line_end:])
    line = refuse(train.main, ['--outdir', tmp_path / 'runs', '--cfg', 'tiny64', '--data', data, '--gpus', '1', '--batch', '2',
                               '--gamma', '1', '--metrics', 'none', '--topology_path', bad, '--dry-run'])
    assert line == f'Error: {bad}: face 1 uses vertex 99999 but the file has 4977 vertices'


# ----------------------------------------------------------------------------------------
# Damaged zip datasets

@pytest.fixture
def dataset_zip(tmp_path):
    root = th.make_dataset(str(tmp_path / 'data'), count=2, resolution=16)
    path = tmp_path / 'data.zip'
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for folder, _, files in os.walk(root):
            for name in files:
                z.write(os.path.join(folder, name), os.path.relpath(os.path.join(folder, name), root))
    return path


def test_zip_member_with_a_bad_crc(dataset_zip, tmp_path):
    member = 'images16x16/00000/img00000000.png'
    with zipfile.ZipFile(dataset_zip) as z:
        info = z.getinfo(member)
    data = bytearray(dataset_zip.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], 'little'), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], 'little')
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0xFF         # one byte of the stored PNG
    dataset_zip.write_bytes(bytes(data))
    dest = tmp_path / 'packed.zip'
    line = refuse(dataset_tool.main, ['--source', dataset_zip, '--dest', dest])
    assert line == f"Error: {dataset_zip}:{member}: damaged zip member (Bad CRC-32 for file '{member}')"
    assert not dest.exists()


class _DamagedItems(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DatasetError('data.zip:img.png: damaged zip member (Bad CRC-32 for file \'img.png\')')


def test_a_dataset_error_in_a_loader_worker_is_one_line(tmp_path, monkeypatch):
    """A damaged member found mid-run is read by a DataLoader worker, and torch puts the worker's
    traceback into the message: train.py printed it all. Now the one line that names the file."""
    def launch(c, outdir):
        next(iter(torch.utils.data.DataLoader(_DamagedItems(), num_workers=1)))
    monkeypatch.setattr(train, 'launch', launch)
    root = th.make_dataset(str(tmp_path / 'data'), count=4, resolution=64, template=BUNDLED_TEMPLATE)
    line = refuse(train.main, ['--outdir', tmp_path / 'runs', '--cfg', 'tiny64', '--data', root, '--gpus', '1', '--batch', '4',
                               '--gamma', '1', '--metrics', 'none'])
    assert line == "Error: data.zip:img.png: damaged zip member (Bad CRC-32 for file 'img.png')"


def test_truncated_zip(dataset_zip, tmp_path):
    data = dataset_zip.read_bytes()
    dataset_zip.write_bytes(data[:len(data) // 2])
    dest = tmp_path / 'packed.zip'
    line = refuse(dataset_tool.main, ['--source', dataset_zip, '--dest', dest])
    assert line == f'Error: {dataset_zip}: damaged zip file (no central directory: truncated?)'
    assert not dest.exists()


# ----------------------------------------------------------------------------------------
# Out of disk space while writing

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_no_space_while_writing_an_mrc(tiny_network, tmp_path, monkeypatch):
    import mrcfile

    def partial_mrc(path, **kwargs):
        with open(path, 'wb') as f:
            f.write(b'partial')
        _no_space()
    monkeypatch.setattr(mrcfile, 'new', partial_mrc)
    out = tmp_path / 'out'
    line = refuse(gen_samples.generate_images, ['--network', tiny_network, '--seeds', '0', '--outdir', out,
                                                '--shapes', 'true', '--shape-res', '16'])
    assert line == f'Error: {out / "seed0000.mrc"}: No space left on device'
    assert sorted(os.listdir(out)) == ['seed0000.png']      # no partial .mrc, no temporary file


def test_no_space_while_writing_an_image(tiny_network, tmp_path, monkeypatch):
    monkeypatch.setattr(persistence.os, 'fsync', _no_space)   # where a full disk shows on many file systems
    out = tmp_path / 'out'
    line = refuse(gen_samples.generate_images, ['--network', tiny_network, '--seeds', '0', '--outdir', out])
    assert line == f'Error: {out / "seed0000.png"}: No space left on device'
    assert os.listdir(out) == []


@pytest.mark.parametrize('option', ['--gamma', '--glr', '--kimg', '--density_reg', '--c-scale'])
@pytest.mark.parametrize('value', ['nan', 'inf'])
def test_train_py_float_options_are_finite(tmp_path, option, value):
    import train
    args = ['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', str(tmp_path / 'no-data'), '--gpus', '1',
            '--batch', '2', '--gamma', '1']
    args += [option, value] if option != '--gamma' else []
    if option == '--gamma':
        args[args.index('--gamma') + 1] = value
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 2 and f'{value} is not a finite number' in result.output, result.output
    assert not (tmp_path / 'runs').exists()
