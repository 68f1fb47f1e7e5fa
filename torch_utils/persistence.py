"""Checkpoints that load without running code.

A module is stored as plain data: its class path, the keyword arguments it was built
with, and its state dict. Files are written with `torch.save` and read with
`torch.load(weights_only=True)`, whose unpickler accepts only tensors and plain
containers, so loading a file cannot execute anything. A stored class name is only
looked up in a registry filled by `@persistent_class`, after importing at most one module
of the fixed list PERSISTENT_MODULES; nothing else read from a file is imported or called.
Before a module is built, its stored arguments are checked: built first on the 'meta'
device (no memory), it must hold exactly the stored tensors' names and shapes, so a file
cannot make the loader allocate more than the tensors it holds.

    @persistence.persistent_class
    class Generator(torch.nn.Module): ...

    persistence.save_checkpoint('net.pkl', dict(G=G, D=D, training_set_kwargs={...}))
    data = persistence.load_checkpoint('net.pkl')      # data['G'] is a Generator again
"""

import contextlib
import copy
import functools
import importlib
import inspect
import io
import numbers
import os
import pickle
import tempfile
import threading
from typing import Optional

import torch

import dnnlib

FORMAT = 'next3d-modern-checkpoint'
FORMAT_VERSION = 1
ALLOWED_PACKAGES = ('training.', 'torch_utils.', 'metrics.')
# The modules that define persistent classes: the only modules a checkpoint can cause to be
# imported (tests/test_loader_hardening.py checks that the list is complete).
PERSISTENT_MODULES = (
    'training.augment',
    'training.dual_discriminator',
    'training.eg3d_generator',
    'training.gaussian_generator',
    'training.mesh.texture_planes',
    'training.networks_stylegan2',
    'training.next3d_generator',
    'training.style_unet',
    'training.superresolution',
    'training.triplane_decoder',
    'training.volumetric_rendering.renderer',
)
# Limits on what a loaded file may hold, checked before anything walks it recursively (an
# official FFHQ EG3D file nests about 20 levels deep and holds some 10**4 items).
MAX_NESTING = 100
MAX_EXPANDED_ITEMS = 10 ** 6        # items counted as a tree: a shared part once per reference
MAX_INT_ARG = 2 ** 31 - 1           # stored constructor arguments are sizes, counts, seeds
# Tensors a module may hold beyond its file's (an official file's UV mask comes from an
# image; non-persistent buffers): 2**24 elements, 64 MB in float32.
_BUILD_SLACK_NUMEL = 2 ** 24
_MODULE_TAG = '__persistent_module__'
_REGISTRY = {}                      # '<module>.<qualname>' -> class, filled by @persistent_class


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
    _REGISTRY[f'{cls.__module__}.{cls.__qualname__}'] = cls
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


def _registered_class(class_name, source: str) -> type:
    """The persistent class registered under `class_name`, importing only a module of PERSISTENT_MODULES."""
    if not isinstance(class_name, str) or not class_name.startswith(ALLOWED_PACKAGES):
        raise CheckpointError(f'{source}: refusing to construct {class_name!r}: only classes from {", ".join(p.rstrip(".") for p in ALLOWED_PACKAGES)} are allowed')
    for module in PERSISTENT_MODULES:
        if class_name not in _REGISTRY and class_name.startswith(module + '.'):
            try:
                importlib.import_module(module)
            except Exception as e:
                raise CheckpointError(f'{source}: cannot import {module} for {class_name}: {type(e).__name__}: {error_summary(e)}') from e
    if class_name not in _REGISTRY:
        raise CheckpointError(f'{source}: unknown class {class_name!r}: not a persistent network class of this version of the code')
    return _REGISTRY[class_name]


def module_from_dict(data: dict, source: str = '<memory>') -> torch.nn.Module:
    """Build the module a `module_to_dict` result describes; only registered persistent classes."""
    cls = _registered_class(data.get('class_name'), source)
    init_kwargs, state = data.get('init_kwargs'), data.get('state_dict')
    if not (isinstance(init_kwargs, dict) and isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f'{source}: {data["class_name"]} is stored without its init_kwargs dict or state_dict of tensors')
    module = build_module(cls, init_kwargs, source, state)
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:
        raise CheckpointError(f'{source}: stored tensors do not fit {data["class_name"]}: {error_summary(e)}') from e
    return module.eval().requires_grad_(False)


def build_module(cls: type, kwargs: dict, source: str, stored: dict, exact: bool = True) -> torch.nn.Module:
    """`cls(**kwargs)` for arguments read from a file, allocating no more than the file's tensors justify.

    `stored`: the file's tensors for this module ({name: tensor}). Integers anywhere in
    `kwargs` must fit in 32 bits (no Python arithmetic on numbers of a million digits). The
    module is first built on the 'meta' device (no memory), where construction may register
    at most 3 layers or tensors per stored tensor (+ 100), which stops loops over absurd
    layer counts early. The meta module must then hold no more tensor elements than `stored`
    (+ 2**24), and with `exact` exactly the names and shapes of `stored`. Only then is it
    built for real. Raises CheckpointError naming `source`.
    """
    name = f'{cls.__module__}.{cls.__qualname__}'
    problem = _int_out_of_range(kwargs, 'init_kwargs')
    if problem:
        raise CheckpointError(f'{source}: {name}: {problem}')
    tensors = {k: v for k, v in stored.items() if isinstance(v, torch.Tensor)}
    max_parts = 3 * len(tensors) + 100
    try:
        with torch.device('meta'), _registration_limit(max_parts):
            probe = cls(**copy.deepcopy(kwargs))
    except _TooManyParts:
        raise CheckpointError(f'{source}: {name}: the stored arguments make more than {max_parts} layers and tensors '
                              f'(the file holds {len(tensors)} tensors)') from None
    except Exception as e:
        raise CheckpointError(f'{source}: cannot build {name} from its stored arguments: {type(e).__name__}: {error_summary(e)}') from e
    if exact:
        ours = {k: tuple(v.shape) for k, v in probe.state_dict().items() if isinstance(v, torch.Tensor)}
        theirs = {k: tuple(v.shape) for k, v in tensors.items()}
        problems = ([f'{k} {theirs[k]} in the file, {ours[k]} from the arguments' for k in ours if k in theirs and ours[k] != theirs[k]]
                    + [f'{k} missing' for k in ours if k not in theirs] + [f'{k} unexpected' for k in theirs if k not in ours])
        if problems:
            raise CheckpointError(f'{source}: stored tensors do not fit {name} built from its stored arguments: '
                                  + '; '.join(problems[:4]) + (f'; ... ({len(problems)} problems)' if len(problems) > 4 else ''))
    numel, stored_numel = _numel_held(probe), sum(v.numel() for v in tensors.values())
    if numel > stored_numel + _BUILD_SLACK_NUMEL:
        raise CheckpointError(f'{source}: {name}: the stored arguments describe {numel:,} tensor elements, '
                              f'more than the file holds ({stored_numel:,})')
    del probe
    try:
        return cls(**kwargs)
    except Exception as e:
        raise CheckpointError(f'{source}: cannot build {name} from its stored arguments: {type(e).__name__}: {error_summary(e)}') from e


def _int_out_of_range(value, where: str) -> Optional[str]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)) > MAX_INT_ARG:
        bits = abs(int(value)).bit_length()
        shown = str(value) if bits <= 64 else f'an integer of {bits} bits'
        return f'{where} = {shown} is out of range (at most {MAX_INT_ARG})'
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        problem = _int_out_of_range(item, f'{where}.{key}' if isinstance(value, dict) else f'{where}[{key}]')
        if problem:
            return problem
    return None


class _TooManyParts(Exception):
    pass


@contextlib.contextmanager
def _registration_limit(limit: int):
    """Raise _TooManyParts once this thread registers more than `limit` submodules, parameters and buffers."""
    from torch.nn.modules import module as torch_module
    thread, count = threading.get_ident(), [0]

    def hook(*args):
        if threading.get_ident() == thread:
            count[0] += 1
            if count[0] > limit:
                raise _TooManyParts()

    handles = [torch_module.register_module_module_registration_hook(hook),
               torch_module.register_module_parameter_registration_hook(hook),
               torch_module.register_module_buffer_registration_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _numel_held(module: torch.nn.Module) -> int:
    """Elements of every parameter, buffer and plain tensor attribute in `module` and its children."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    for m in module.modules():
        tensors.update({id(v): v for v in vars(m).values() if isinstance(v, torch.Tensor)})
    return sum(t.numel() for t in tensors.values())


_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.Tensor, torch.dtype, torch.device)


def _children(obj) -> list:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    attributes = getattr(obj, '__dict__', None)
    return list(attributes.values()) if type(attributes) is dict else []


def structure_problem(value) -> Optional[str]:
    """Why `value`, just loaded from a file, is unsafe to walk recursively (None if it is not).

    Refused: nesting deeper than MAX_NESTING (Python's recursion limit), a container that
    contains itself, and more than MAX_EXPANDED_ITEMS items counted as a tree (a small file
    of shared parts that expands exponentially). Containers are dicts, lists, tuples, sets
    and objects with instance attributes; the walk itself is iterative.
    """
    depth, items, active = {}, {}, set()
    stack = [(value, None)]
    while stack:
        obj, children = stack.pop()
        key = id(obj)
        if children is None:                            # first visit
            if key in depth:
                continue
            if key in active:
                return 'it contains itself (a reference cycle)'
            if len(active) >= MAX_NESTING:
                return f'it is nested deeper than {MAX_NESTING} levels'
            active.add(key)
            children = _children(obj)
            stack.append((obj, children))
            stack.extend((c, None) for c in children if not isinstance(c, _ATOMS))
        else:                                           # after all children
            active.discard(key)
            depth[key] = 1 + max((depth.get(id(c), 0) for c in children), default=0)
            items[key] = 1 + sum(items.get(id(c), 1) for c in children)
            if depth[key] > MAX_NESTING:
                return f'it is nested deeper than {MAX_NESTING} levels'
            if items[key] > MAX_EXPANDED_ITEMS:
                return f'it expands to more than {MAX_EXPANDED_ITEMS} items (shared parts counted once per reference)'
    return None


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
def atomic_output(path: str, suffix: str = '.tmp', fsync: bool = True):
    """Yield a temporary path beside `path`; on success it replaces `path` (fsync'd, mode per umask).

    On any exception the temporary file is removed and `path` keeps its old content. An
    OSError of the writing (a full disk) is re-raised naming `path`, not the temporary file.
    fsync=False skips the flush to disk (many small files that can be made again).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix=suffix, dir=folder)
        os.close(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e
    try:
        yield tmp
        if fsync:
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is not None and e.filename in (None, tmp):
            raise OSError(e.errno, e.strerror, path) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if not fsync:
        return
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass    # some file systems do not allow fsync on folders


def atomic_write_bytes(path: str, data: bytes, fsync: bool = True):
    """Write `data` to `path` so that `path` is either the old file or the complete new one."""
    with atomic_output(path, fsync=fsync) as tmp:
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
                              f'which could run code on load. Official EG3D/Next3D pickles go through legacy.load_network_pkl. '
                              f'({error_summary(e)})') from e
    except Exception as e:          # RuntimeError, EOFError, BadZipFile, OSError, ... from a damaged file
        raise CheckpointError(f'{source}: truncated or corrupt checkpoint ({type(e).__name__}: {error_summary(e)})') from e


def error_summary(error: BaseException, limit: int = 300) -> str:
    """An exception's message as one line of at most `limit` characters, for an error that names a file.

    torch's weights-only refusals are reduced to their reason ('Unsupported operand 139').
    """
    text = str(error)
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1].strip().split('\n\n', 1)[0]
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def load_checkpoint(f, source: str = None) -> dict:
    """Load a file written by save_checkpoint; modules come back built, in eval mode, on the CPU."""
    source = source or (os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, 'name', '<file object>'))
    payload = load_raw(f, source)
    problem = structure_problem(payload)
    if problem:
        raise CheckpointError(f'{source}: refused to load: {problem}')
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise CheckpointError(f'{source}: not a checkpoint of this project (no "{FORMAT}" header)')
    version = payload.get('format_version', 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f'{source}: checkpoint format version {version!r} is not one this code reads (up to {FORMAT_VERSION})')
    if not isinstance(payload.get('data'), dict):
        raise CheckpointError(f'{source}: the checkpoint holds no data dict')
    return _decode(payload['data'], source)
