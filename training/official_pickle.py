"""Read official EG3D/Next3D network pickles without running the code they embed.

The official files are plain pickles in which every network object is reduced to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` holds the
class's Python source (`module_src`), its name, and the object's state (`_init_args`,
`_init_kwargs`, `_parameters`, `_buffers`, `_modules`, plain attributes). Loading such a
file with `pickle.load` executes `module_src` (and imports whatever it imports). Here a
restricted unpickler resolves only a fixed list of globals: persistent objects and classes
pickled by reference become `ModuleRecord`s (class name + state, source ignored), tensors
are rebuilt through `torch.load(weights_only=True)`, and any other global is refused
with an error naming the file.
"""

import collections
import io
import pickle

import numpy as np
import torch


class OfficialPickleError(ValueError):
    """An official pickle that cannot be read safely; the message names the file."""


class ModuleRecord:
    """What an official module object held: class name, constructor arguments, state."""

    def __init__(self, class_name: str, state: dict = None):
        self.class_name = class_name
        self.state = state or {}

    def __setstate__(self, state):         # used for classes pickled by reference
        self.class_name = getattr(type(self), '_official_name', type(self).__name__)
        self.state = state if isinstance(state, dict) else {'_state': state}

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get('_init_args', ()))

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get('_init_kwargs', {}))

    def children(self) -> dict:
        return dict(self.state.get('_modules', {}) or {})

    def named_tensors(self, prefix: str = '') -> dict:
        """Flattened {dotted name: tensor} of parameters and buffers, like state_dict()."""
        out = {}
        for group in ('_parameters', '_buffers'):
            for name, tensor in (self.state.get(group) or {}).items():
                if tensor is not None:
                    out[prefix + name] = tensor.detach() if isinstance(tensor, torch.Tensor) else tensor
        for name, child in self.children().items():
            if isinstance(child, ModuleRecord):
                out.update(child.named_tensors(prefix + name + '.'))
        return out

    def __repr__(self):
        return f'ModuleRecord({self.class_name})'


def _reconstruct_persistent(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class':
        raise pickle.UnpicklingError(f'unexpected persistent-object metadata of type {meta.get("type") if isinstance(meta, dict) else type(meta)}')
    # meta['module_src'] is deliberately never looked at beyond this point.
    return ModuleRecord(meta.get('class_name', '?'), meta.get('state') or {})


def _load_storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True, map_location='cpu')


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if isinstance(storage, torch.Tensor):          # storages saved by newer torch come back as tensors
        storage = storage.untyped_storage() if hasattr(storage, 'untyped_storage') else storage
    t = torch.empty((0,), dtype=getattr(storage, 'dtype', torch.float32))
    t.set_(storage, storage_offset, size, stride)
    return t


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    return torch.nn.Parameter(data, requires_grad=requires_grad)


class _EasyDict(dict):
    def __setstate__(self, state):
        self.update(state)


_SAFE_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent,
    ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('dnnlib', 'EasyDict'): _EasyDict,
    ('torch', 'Size'): torch.Size,
    ('torch', 'device'): torch.device,
}
_NUMPY_GLOBALS = {'_reconstruct', 'ndarray', 'dtype', 'scalar'}
# Classes of the official code base that may appear pickled by reference, and torch's own
# modules: they become ModuleRecords (never imported).
_RECORD_PREFIXES = ('training.', 'training_avatar_texture.', 'torch.nn.modules.', 'torch_utils.')


def _safe_reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, ModuleRecord)):
        raise pickle.UnpicklingError(f'copyreg._reconstructor of {cls!r} is not allowed')
    return cls.__new__(cls)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module in ('numpy.core.multiarray', 'numpy._core.multiarray', 'numpy') and name in _NUMPY_GLOBALS:
            return getattr(np.core.multiarray if name in ('_reconstruct', 'scalar') else np, name)
        if module.startswith('numpy') and name.endswith('DType'):    # numpy >= 1.25 dtype classes
            return type(np.dtype(name[:-5].lower() if name != 'DType' else 'float32'))
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == 'torch' and name.endswith('Storage'):
            return getattr(torch, name)
        if (module, name) == ('copyreg', '_reconstructor'):
            return _safe_reconstructor
        if module.startswith(_RECORD_PREFIXES) and name[:1].isupper():
            return type(name, (ModuleRecord,), {'_official_name': f'{module}.{name}'})
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _finish_records(obj):
    """Give by-reference records their class name (NEWOBJ skips __init__)."""
    seen = set()

    def visit(o):
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, ModuleRecord):
            if not hasattr(o, 'class_name'):
                o.class_name = getattr(type(o), '_official_name', type(o).__name__)
            if not hasattr(o, 'state'):
                o.state = {}
            for v in o.state.values():
                visit(v)
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)
    visit(obj)
    return obj


def load_official_pickle(f, source: str = '<file object>') -> dict:
    """Read an official network pickle -> dict(G=ModuleRecord, D=..., G_ema=..., training_set_kwargs=dict, ...)."""
    try:
        data = _RestrictedUnpickler(f, encoding='latin1').load()
    except pickle.UnpicklingError as e:
        raise OfficialPickleError(f'{source}: cannot be read safely: {e}') from e
    except (EOFError, ValueError, RuntimeError) as e:
        raise OfficialPickleError(f'{source}: truncated or corrupt network pickle ({type(e).__name__}: {e})') from e
    if not isinstance(data, dict):
        raise OfficialPickleError(f'{source}: expected a dict of networks, found {type(data).__name__}')
    return _finish_records(data)
