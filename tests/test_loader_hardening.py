"""Network files that try to run, change or exhaust something are refused with an error naming the file.

Covers our snapshots (torch_utils/persistence.py) and official pickles
(training/official_pickle.py): opcodes that mutate allowed objects, globals that do not
exist, nesting that would exhaust Python's recursion limit, constructor arguments that
would allocate more than the file holds, class names outside the fixed registry, and
writes that fail half way.
"""

import contextlib
import errno
import io
import os
import pickle
import re
import struct
import sys

import pytest
import torch

import legacy
import training
from torch_utils import persistence
from training import official_pickle
from training.official_pickle import OfficialPickleError, load_official_pickle

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def memory_cap(headroom_gib: float = 2.0):
    """Limit this process's address space to its current size + `headroom_gib` (Linux), so that a
    loader that did try to allocate what a file asks for fails at once instead of exhausting
    the machine's memory."""
    try:
        import resource
        with open('/proc/self/status') as f:
            size = int(next(line for line in f if line.startswith('VmSize:')).split()[1]) * 1024
    except (ImportError, OSError, StopIteration):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + int(headroom_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------------------------------
# Hand-written pickle opcodes (protocol 2), to build files no pickler would write.

def _str(s: str) -> bytes:
    data = s.encode()
    return b'X' + struct.pack('<I', len(data)) + data        # BINUNICODE


def _global(module: str, name: str) -> bytes:
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _as_g(value_ops: bytes) -> bytes:
    """A pickle of {'G': <value_ops>}."""
    return b'\x80\x02}' + _str('G') + value_ops + b's.'


def _slot_state(name: str, value_ops: bytes) -> bytes:
    """BUILD state (None, {name: value}): pickle applies the dict with setattr."""
    return b'N}' + _str(name) + value_ops + b's\x86'


def _nested_lists(depth: int) -> bytes:
    return b']' * depth + b'a' * (depth - 1)


# ---------------------------------------------------------------------------------------
# Official pickles: BUILD on allowed globals.

def test_build_on_allowed_function_refused_and_changes_nothing():
    func = official_pickle._rebuild_tensor_v2
    defaults = func.__defaults__
    blob = _as_g(_global('torch._utils', '_rebuild_tensor_v2') + _slot_state('__defaults__', _str('a') + _str('b') + _str('c') + b'\x87') + b'b')
    try:
        with pytest.raises(OfficialPickleError, match=r'^evil\.pkl: .*torch\._utils\._rebuild_tensor_v2.*not allowed'):
            load_official_pickle(io.BytesIO(blob), 'evil.pkl')
        assert func.__defaults__ == defaults
    finally:
        func.__defaults__ = defaults


def test_build_on_allowed_class_refused_and_changes_nothing():
    cls = official_pickle._EasyDict
    setstate = cls.__dict__['__setstate__']
    blob = _as_g(_global('dnnlib', 'EasyDict') + _slot_state('__setstate__', _global('builtins', 'set')) + b'b')
    try:
        with pytest.raises(OfficialPickleError, match=r'^evil\.pkl: .*dnnlib\.EasyDict.*not allowed'):
            load_official_pickle(io.BytesIO(blob), 'evil.pkl')
        assert cls.__dict__['__setstate__'] is setstate
    finally:
        cls.__setstate__ = setstate


def test_build_on_allowed_container_refused():
    blob = _as_g(_global('collections', 'OrderedDict') + b')R' + _slot_state('x', b'K\x01') + b'b')
    with pytest.raises(OfficialPickleError, match=r'^evil\.pkl: .*OrderedDict.*not allowed'):
        load_official_pickle(io.BytesIO(blob), 'evil.pkl')


def test_numpy_array_allocation_refused():
    # numpy.ndarray is allowed as an argument of numpy's own reconstructor, never as a callable.
    blob = _as_g(_global('numpy', 'ndarray') + b'\x8a\x06\x00\x00\x00\x00\x00\x01\x85R')      # shape (2**40,)
    with pytest.raises(OfficialPickleError, match=r'^evil\.pkl: .*numpy\.ndarray.*not allowed'):
        load_official_pickle(io.BytesIO(blob), 'evil.pkl')


# ---------------------------------------------------------------------------------------
# Official pickles: every failure names the file.

@pytest.mark.parametrize('ops, message', [
    pytest.param(_global('dnnlib', 'EasyDict') + b')R' + b'K\x05b', r'dnnlib\.EasyDict.*must be a dict', id='build-bad-state'),
    pytest.param(_global('numpy.dtypes', 'BogusDType'), r"global 'numpy\.dtypes\.BogusDType' is not allowed", id='numpy-dtype'),
    pytest.param(_global('torch', 'NoSuchStorage'), r"global 'torch\.NoSuchStorage' is not allowed", id='torch-storage'),
    pytest.param(_nested_lists(100000), r'nested deeper than 100 levels', id='deep-nesting'),
    pytest.param(b']q\x00h\x00a', r'contains itself', id='cycle'),
    pytest.param(_global('torch._utils', '_rebuild_tensor_v2') + b'(' + _str('x') + b'K\x00))tR', r'truncated or corrupt',
                 id='bad-tensor-args'),
])
def test_official_pickle_errors_name_the_file(ops, message):
    with pytest.raises(OfficialPickleError, match=r'^bad\.pkl: .*' + message) as info:
        load_official_pickle(io.BytesIO(_as_g(ops)), 'bad.pkl')
    assert '\n' not in str(info.value)                  # one error line, even for torch's multi-line messages


def test_official_numpy_data_still_loads():
    import numpy as np
    data = {'G': None, 'arr': np.arange(6.0).reshape(2, 3), 'scalar': np.float32(2.5), 'dtype': np.dtype('<f2'),
            'dtype_class': type(np.dtype('float64')), 'storage_class': torch.FloatStorage, 'size': torch.Size([2, 3])}
    out = load_official_pickle(io.BytesIO(pickle.dumps(data, protocol=4)), 'ok.pkl')
    assert np.array_equal(out['arr'], data['arr']) and out['scalar'] == np.float32(2.5)
    assert out['dtype'] == np.dtype('<f2') and out['dtype_class'] is type(np.dtype('float64'))
    assert out['storage_class'] is torch.FloatStorage and out['size'] == torch.Size([2, 3])


def test_official_record_prefixes_need_the_dot():
    # 'training_x' is not the official 'training' package: such a global must not become a record.
    for module in ('training_x', 'torch_utilsx'):
        with pytest.raises(OfficialPickleError, match=rf"^bad\.pkl: .*global '{module}\.Foo' is not allowed"):
            load_official_pickle(io.BytesIO(_as_g(_global(module, 'Foo') + b')\x81')), 'bad.pkl')


def test_official_huge_constructor_argument_refused(tmp_path):
    # An official generator whose stored sizes would need far more memory than its tensors:
    # refused before anything of that size is allocated.
    from tests.test_legacy_import import eg3d_pickle, eg3d_source
    src = eg3d_source()
    src.w_dim = 2 ** 30                         # every layer that uses it: >= 32 GiB
    path = tmp_path / 'huge-official.pkl'
    path.write_bytes(eg3d_pickle(src))
    with memory_cap(), pytest.raises(persistence.CheckpointError, match=r'^' + re.escape(str(path)) + r' \[G\]: .*more than the file'):
        legacy.load_network_pkl(str(path))


def test_official_bad_constructor_argument_names_the_file(tmp_path):
    from tests.test_legacy_import import eg3d_pickle, eg3d_source
    src = eg3d_source()
    src.z_dim = 'many'
    path = tmp_path / 'bad-official.pkl'
    path.write_bytes(eg3d_pickle(src))
    with pytest.raises(persistence.CheckpointError, match=r'^' + re.escape(str(path)) + r" \[G\]: .*ValueError: invalid literal for int\(\) with base 10: 'many'"):
        legacy.load_network_pkl(str(path))


# ---------------------------------------------------------------------------------------
# Our snapshots.

@persistence.persistent_class
class WideNet(torch.nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc = torch.nn.Linear(in_dim, out_dim)


REAL_LAYERS_BUILT = []


class CountedLayer(torch.nn.Linear):
    def __init__(self):
        super().__init__(1, 1)
        if self.weight.device.type != 'meta':
            REAL_LAYERS_BUILT.append(1)


@persistence.persistent_class
class DeepNet(torch.nn.Module):
    def __init__(self, num_layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList([CountedLayer() for _ in range(num_layers)])


@pytest.fixture
def allow_test_classes(monkeypatch):
    monkeypatch.setattr(persistence, 'ALLOWED_PACKAGES', persistence.ALLOWED_PACKAGES + (__name__ + '.',))


def _save_module_dict(path, module_dict: dict):
    payload = {'format': persistence.FORMAT, 'format_version': persistence.FORMAT_VERSION, 'data': {'G': module_dict}}
    torch.save(payload, str(path))


def test_huge_constructor_argument_refused_before_allocating(tmp_path, allow_test_classes):
    path = tmp_path / 'huge.pkl'
    stored = persistence.module_to_dict(WideNet(3, 4))
    stored['init_kwargs'] = dict(in_dim=2 ** 30, out_dim=2 ** 30)
    _save_module_dict(path, stored)
    with memory_cap(), pytest.raises(persistence.CheckpointError, match=r'^' + re.escape(str(path)) + r': stored tensors do not fit .*WideNet.*fc\.weight'):
        legacy.load_network_pkl(str(path))


def test_out_of_range_integer_argument_refused(tmp_path, allow_test_classes):
    path = tmp_path / 'bigint.pkl'
    stored = persistence.module_to_dict(WideNet(3, 4))
    stored['init_kwargs'] = dict(in_dim=10 ** 12, out_dim=4)
    _save_module_dict(path, stored)
    with memory_cap(), pytest.raises(persistence.CheckpointError, match=r'^' + re.escape(str(path)) + r': .*WideNet.*in_dim = 1000000000000 is out of range'):
        legacy.load_network_pkl(str(path))


def test_torch_refusal_is_one_line_with_its_reason(tmp_path, allow_test_classes):
    path = tmp_path / 'bigint.pkl'
    stored = persistence.module_to_dict(WideNet(3, 4))
    stored['init_kwargs'] = dict(in_dim=10 ** 1000, out_dim=4)          # torch's weights-only reader refuses the opcode
    _save_module_dict(path, stored)
    with pytest.raises(persistence.CheckpointError, match=r'^' + re.escape(str(path)) + r': refused to load: .*\(Unsupported operand \d+\)$') as info:
        legacy.load_network_pkl(str(path))
    assert '\n' not in str(info.value)


def test_layer_count_bomb_stopped_on_the_meta_device(tmp_path, allow_test_classes):
    path = tmp_path / 'layers.pkl'
    stored = persistence.module_to_dict(DeepNet(1))
    stored['init_kwargs'] = dict(num_layers=50000)
    _save_module_dict(path, stored)
    REAL_LAYERS_BUILT.clear()
    with pytest.raises(persistence.CheckpointError, match=r'^' + re.escape(str(path)) + r': .*DeepNet.*more than 106 layers and tensors.*2 tensors'):
        legacy.load_network_pkl(str(path))
    assert not REAL_LAYERS_BUILT
    persistence.save_checkpoint(str(path), dict(G=DeepNet(2)))                 # the honest file loads
    assert len(legacy.load_network_pkl(str(path)).G.layers) == 2


def _snapshot_with_data_pickle(path, data_ops: bytes):
    """A torch.save zip whose data.pkl is {'format': ..., 'format_version': 1, 'data': {'x': <data_ops>}}."""
    import zipfile
    template = io.BytesIO()
    torch.save(None, template)
    pkl = (b'\x80\x02}' + _str('format') + _str(persistence.FORMAT) + b's' + _str('format_version') + b'K\x01s'
           + _str('data') + b'}' + _str('x') + data_ops + b'ss.')
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(path, 'w') as dst:
        for name in src.namelist():
            dst.writestr(name, pkl if name.endswith('/data.pkl') else src.read(name))


def _doubling(levels: int) -> bytes:
    """[x, x] where x = [y, y] ...: a small file that expands to 2**levels lists."""
    ops = b'](]q\x00'                                   # [ (mark) memo[0] = []
    for i in range(levels):                             # memo[i + 1] = (memo[i], memo[i])
        ops += b'h' + bytes([i]) + b'h' + bytes([i]) + b'\x86q' + bytes([i + 1])
    return ops + b'e'                                   # [memo[0], ..., memo[levels]]


@pytest.mark.parametrize('ops, message', [
    pytest.param(_nested_lists(100000), 'nested deeper than 100 levels', id='deep'),
    pytest.param(b']q\x00h\x00a', 'contains itself', id='cycle'),
    pytest.param(_doubling(21), 'more than 1000000 items', id='expansion'),
])
def test_snapshot_structure_bombs_refused(tmp_path, ops, message):
    path = tmp_path / 'bomb.pkl'
    _snapshot_with_data_pickle(path, ops)
    with pytest.raises(persistence.CheckpointError, match=r'^' + re.escape(str(path)) + r': refused to load: .*' + message):
        persistence.load_checkpoint(str(path))


# ---------------------------------------------------------------------------------------
# Nothing from a file chooses what is imported or built.

def test_class_outside_the_fixed_registry_is_not_imported(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned.txt'
    monkeypatch.setenv('NEXT3D_PWNED', str(marker))
    (tmp_path / 'evil_persist.py').write_text(
        'import os, pathlib, torch\n'
        'from torch_utils import persistence\n'
        "pathlib.Path(os.environ['NEXT3D_PWNED']).write_text('imported')\n"
        '@persistence.persistent_class\n'
        'class Evil(torch.nn.Module):\n'
        '    def __init__(self):\n'
        '        super().__init__()\n')
    monkeypatch.setattr(training, '__path__', list(training.__path__) + [str(tmp_path)])
    monkeypatch.delitem(sys.modules, 'training.evil_persist', raising=False)
    monkeypatch.setattr(persistence, '_REGISTRY', dict(persistence._REGISTRY))
    path = tmp_path / 'net.pkl'
    _save_module_dict(path, {'__persistent_module__': True, 'class_name': 'training.evil_persist.Evil', 'init_kwargs': {}, 'state_dict': {}})
    with pytest.raises(persistence.CheckpointError, match=r'^' + re.escape(str(path)) + r": unknown class 'training\.evil_persist\.Evil'"):
        legacy.load_network_pkl(str(path))
    assert not marker.exists()
    assert 'training.evil_persist' not in sys.modules


def test_fixed_module_list_names_every_persistent_class():
    found = set()
    for package in ('training', 'torch_utils', 'metrics'):
        for folder, _, files in os.walk(os.path.join(REPO_ROOT, package)):
            for name in files:
                if name.endswith('.py'):
                    with open(os.path.join(folder, name), encoding='utf-8') as f:
                        if re.search(r'^@(persistence\.)?persistent_class\b', f.read(), re.MULTILINE):
                            found.add(os.path.relpath(os.path.join(folder, name[:-3]), REPO_ROOT).replace(os.sep, '.'))
    assert found == set(persistence.PERSISTENT_MODULES)


@pytest.mark.parametrize('module', ['training_x', 'torch_utilsx', 'metricsx'])
def test_allowed_packages_need_the_dot(tmp_path, monkeypatch, module):
    monkeypatch.setattr(persistence, '_REGISTRY', dict(persistence._REGISTRY))
    cls = type('Foo', (torch.nn.Module,), {'__module__': module, '__init__': lambda self: torch.nn.Module.__init__(self)})
    persistence.persistent_class(cls)
    path = tmp_path / 'net.pkl'
    persistence.save_checkpoint(str(path), dict(G=cls()))
    with pytest.raises(persistence.CheckpointError, match=rf"^{re.escape(str(path))}: refusing to construct '{module}\.Foo'"):
        persistence.load_checkpoint(str(path))


# ---------------------------------------------------------------------------------------
# Writing: fsync before the rename, and a full disk.

def test_writer_fsyncs_the_temp_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(('fsync', os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(('replace', os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    path = tmp_path / 'out.bin'
    persistence.atomic_write_bytes(str(path), b'data')
    assert path.read_bytes() == b'data'
    replaced = [ino for kind, ino in events if kind == 'replace']
    assert len(replaced) == 1
    assert events.index(('fsync', replaced[0])) < events.index(('replace', replaced[0]))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullDiskFile:
    """A binary file that takes a few bytes and then reports a full disk."""

    def __init__(self, path, mode):
        self.f = open(path, mode)

    def write(self, data):
        self.f.write(bytes(data[:10]))
        _no_space()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize('where', ['write', 'fsync', 'mkstemp'])
def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, where):
    path = tmp_path / 'network-snapshot-000000.pkl'
    persistence.save_checkpoint(str(path), dict(x=torch.arange(3)))
    before = path.read_bytes()
    with monkeypatch.context() as m:
        if where == 'write':
            m.setattr(persistence, 'open', _FullDiskFile, raising=False)
        elif where == 'fsync':
            m.setattr(os, 'fsync', _no_space)
        else:
            m.setattr(persistence.tempfile, 'mkstemp', _no_space)
        with pytest.raises(OSError) as info:
            persistence.save_checkpoint(str(path), dict(x=torch.arange(1000)))
    # The error names the destination, not the temporary file (scripts print '<file>: <strerror>').
    assert (info.value.errno, info.value.strerror, info.value.filename) == (errno.ENOSPC, 'No space left on device', str(path))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
