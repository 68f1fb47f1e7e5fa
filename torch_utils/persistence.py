"""Checkpoints that load without running code.

A module is stored as plain data: its class path, the keyword arguments it was built
with, and its state dict. Files are written with `torch.save` and read with
`torch.load(weights_only=True)`, whose unpickler accepts only tensors and plain
containers, so loading a file cannot execute anything. Only classes of this project's
packages that are marked `@persistent_class` are constructed.

    @persistence.persistent_class
    class Generator(torch.nn.Module): ...

    persistence.save_checkpoint('net.pkl', dict(G=G, D=D, training_set_kwargs={...}))
    data = persistence.load_checkpoint('net.pkl')      # data['G'] is a Generator again
"""

import contextlib
import copy
import functools
import inspect
import io
import os
import pickle
import tempfile
import zipfile

import torch

import dnnlib

FORMAT = 'next3d-modern-checkpoint'
FORMAT_VERSION = 1
ALLOWED_PACKAGES = ('training.', 'torch_utils.', 'metrics.')
_MODULE_TAG = '__persistent_module__'


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def persistent_class(cls):
    """Class decorator: remember the constructor's arguments in `self.init_kwargs`."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError('persistent_class expects a torch.nn.Module subclass')
    original_init = cls.__init__
    signature = inspect.signature(original_init)
    for p in signature.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            raise TypeError(f'{cls.__name__}.__init__ takes *{p.name}: persistent classes need keyword-only-able arguments')

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init_kwargs = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
                init_kwargs.update(value)
            else:
                init_kwargs[name] = value
        init_kwargs = copy.deepcopy(init_kwargs)
        original_init(self, *args, **kwargs)
        if type(self) is cls:   # the outermost decorated class records, not its bases
            self.init_kwargs = _to_plain(init_kwargs, f'{cls.__name__}.init_kwargs')

    cls.__init__ = __init__
    cls._persistent = True
    return cls


def _to_plain(value, where: str):
    """Convert EasyDicts to dicts and check that only weights_only-safe types remain."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype)):
        return value
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f'{where}: dict key {k!r} is not a string')
        return {k: _to_plain(v, f'{where}.{k}') for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_to_plain(v, f'{where}[{i}]') for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f'{where}: {type(value).__name__} cannot be stored in a safe checkpoint')


def module_to_dict(module: torch.nn.Module) -> dict:
    """A persistent module -> {class_name, init_kwargs, state_dict} of plain data and tensors."""
    if not getattr(type(module), '_persistent', False) or not hasattr(module, 'init_kwargs'):
        raise TypeError(f'{type(module).__qualname__} is not a @persistent_class and cannot be saved')
    class_name = f'{type(module).__module__}.{type(module).__qualname__}'
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return {_MODULE_TAG: True, 'class_name': class_name, 'init_kwargs': module.init_kwargs, 'state_dict': state}


def module_from_dict(data: dict, source: str = '<memory>') -> torch.nn.Module:
    """Build the module a `module_to_dict` result describes; only this project's persistent classes."""
    class_name = data.get('class_name')
    if not isinstance(class_name, str) or not class_name.startswith(ALLOWED_PACKAGES):
        raise CheckpointError(f'{source}: refusing to construct {class_name!r}: only classes from {", ".join(p.rstrip(".") for p in ALLOWED_PACKAGES)} are allowed')
    try:
        cls = dnnlib.get_obj_by_name(class_name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f'{source}: class {class_name} does not exist in this version of the code ({e})') from e
    if not (isinstance(cls, type) and getattr(cls, '_persistent', False)):
        raise CheckpointError(f'{source}: {class_name} is not a persistent module class')
    try:
        module = cls(**data['init_kwargs'])
    except TypeError as e:
        raise CheckpointError(f'{source}: cannot build {class_name} from its stored arguments: {e}') from e
    try:
        module.load_state_dict(data['state_dict'], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f'{source}: stored tensors do not fit {class_name}: {e}') from e
    return module.eval().requires_grad_(False)


def _encode(value):
    if isinstance(value, torch.nn.Module):
        return module_to_dict(value)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(v) for v in value)
    return value


def _decode(value, source):
    if isinstance(value, dict):
        if value.get(_MODULE_TAG) is True:
            return module_from_dict(value, source)
        return dnnlib.EasyDict({k: _decode(v, source) for k, v in value.items()})
    if isinstance(value, list):
        return [_decode(v, source) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v, source) for v in value)
    return value


@contextlib.contextmanager
def atomic_output(path: str, suffix: str = '.tmp'):
    """Yield a temporary path beside `path`; on success it replaces `path` (fsync'd, mode per umask).

    On any exception the temporary file is removed and `path` keeps its old content.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass    # some file systems do not allow fsync on folders


def atomic_write_bytes(path: str, data: bytes):
    """Write `data` to `path` so that `path` is either the old file or the complete new one."""
    with atomic_output(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)


def save_checkpoint(path: str, data: dict):
    """Atomically save a dict whose values may be persistent modules, tensors and plain data."""
    payload = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'data': _encode(data)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_raw(f, source: str = None) -> dict:
    """torch.load(weights_only=True) with errors that name the file. `f` is a path or a binary file."""
    source = source or (os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, 'name', '<file object>'))
    if isinstance(f, (str, os.PathLike)) and not os.path.isfile(f):
        raise FileNotFoundError(f'{source}: no such checkpoint file')
    try:
        return torch.load(f, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f'{source}: refused to load: the file holds objects other than tensors and plain data, '
                              f'which could run code on load. Official EG3D/Next3D pickles go through legacy.load_network_pkl. ({e})') from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f'{source}: truncated or corrupt checkpoint ({type(e).__name__}: {e})') from e


def load_checkpoint(f, source: str = None) -> dict:
    """Load a file written by save_checkpoint; modules come back built, in eval mode, on the CPU."""
    source = source or (os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, 'name', '<file object>'))
    payload = load_raw(f, source)
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise CheckpointError(f'{source}: not a checkpoint of this project (no "{FORMAT}" header)')
    if payload.get('format_version', 0) > FORMAT_VERSION:
        raise CheckpointError(f'{source}: checkpoint format version {payload["format_version"]} is newer than this code ({FORMAT_VERSION})')
    return _decode(payload['data'], source)
