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

The reader is pickle's pure-Python unpickler with every opcode that calls or changes an
object restricted (the C unpickler cannot be changed per opcode): only the allowed
callables may be called (REDUCE, NEWOBJ, OBJ, INST), and only a few plain-data types may
have their state set (BUILD), so a file cannot modify an allowed function or class for the
rest of the process. After reading, the structure is checked (nesting, cycles, size)
before anything walks it recursively.
"""

import collections
import io
import pickle

import numpy as np
import torch

from torch_utils.persistence import error_summary, structure_problem


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
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f'the state of a dnnlib.EasyDict must be a dict, not {type(state).__name__}')
        self.update(state)


def _numpy_reconstruct(subtype, shape, dtype):
    # numpy pickles an array as an empty one whose state (shape, dtype, bytes) BUILD then sets.
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f'numpy._reconstruct({getattr(subtype, "__name__", subtype)}, {shape!r}) is not allowed')
    return np.empty((0,), dtype=np.int8)


def _numpy_dtype(spec, align=False, copy=False):
    # Always a new dtype object (copy=False can return numpy's shared one), as BUILD sets its state.
    return np.dtype(spec, bool(align), True)


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
_NUMPY_MODULES = ('numpy', 'numpy.core.multiarray', 'numpy._core.multiarray')
# numpy's scalar reconstructor, by what a scalar pickles with: numpy 2's numpy._core.multiarray
# or numpy 1's numpy.core.multiarray (numpy 1.26 has a numpy._core without that attribute).
_NUMPY_GLOBALS = {'_reconstruct': _numpy_reconstruct, 'dtype': _numpy_dtype, 'scalar': np.float32(0).__reduce__()[0]}
# Classes of the official code base that may appear pickled by reference, and torch's own
# modules: they become ModuleRecords (never imported).
_RECORD_PREFIXES = ('training.', 'training_avatar_texture.', 'torch.nn.modules.', 'torch_utils.')


def _safe_reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, ModuleRecord)):
        raise pickle.UnpicklingError(f'copyreg._reconstructor of {cls!r} is not allowed')
    return cls.__new__(cls)


# What a file may call (besides ModuleRecord classes). numpy.ndarray, storage and dtype
# classes are allowed as values only: calling them would allocate whatever size the file asks.
_CALLABLE = {id(f): f for f in [*_SAFE_GLOBALS.values(), *_NUMPY_GLOBALS.values(), _safe_reconstructor]}


def _may_call(func) -> bool:
    return id(func) in _CALLABLE or (isinstance(func, type) and issubclass(func, ModuleRecord))


def _may_set_state(obj) -> bool:
    """BUILD is allowed on instances of these plain-data types only (never on functions or classes);
    each was made by this unpickler (numpy's through _numpy_reconstruct / _numpy_dtype)."""
    return isinstance(obj, (ModuleRecord, _EasyDict, np.dtype)) or type(obj) is np.ndarray


class _RestrictedUnpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._names = {}                            # id(allowed global) -> 'module.name', for messages

    def find_class(self, module, name):
        obj = self._resolve(module, name)
        self._names[id(obj)] = f'{module}.{name}'
        return obj

    def _resolve(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[name]
        if module in _NUMPY_MODULES and name == 'ndarray':
            return np.ndarray
        dtype_class = getattr(getattr(np, 'dtypes', None), name, None)       # numpy >= 1.25 dtype classes
        if module in ('numpy', 'numpy.dtypes') and isinstance(dtype_class, type) and issubclass(dtype_class, np.dtype):
            return dtype_class
        value = getattr(torch, name, None) if module == 'torch' else None
        if isinstance(value, torch.dtype):
            return value
        if name.endswith('Storage') and isinstance(value, type) and issubclass(value, (torch.storage.TypedStorage, torch.UntypedStorage)):
            return value
        if (module, name) == ('copyreg', '_reconstructor'):
            return _safe_reconstructor
        if module.startswith(_RECORD_PREFIXES) and name[:1].isupper():
            return type(name, (ModuleRecord,), {'_official_name': f'{module}.{name}'})
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def _describe(self, obj) -> str:
        return self._names.get(id(obj)) or f'an object of type {type(obj).__name__}'

    def _call(self, func, args, kwargs=None, new=False):
        if not _may_call(func) or (new and not isinstance(func, type)):
            raise pickle.UnpicklingError(f'{"creating" if new else "calling"} {self._describe(func)} is not allowed')
        if not isinstance(args, tuple) or not isinstance(kwargs or {}, dict):
            raise pickle.UnpicklingError(f'arguments of {self._describe(func)} are not a tuple')
        return func.__new__(func, *args, **(kwargs or {})) if new else func(*args)

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, new=True))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, kwargs, new=True))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):           # the INST and OBJ opcodes (protocols 0 and 1)
        self.append(self._call(klass, tuple(args)))

    def load_build(self):
        state = self.stack.pop()
        obj = self.stack[-1]
        if not _may_set_state(obj):
            raise pickle.UnpicklingError(f'setting the state of {self._describe(obj)} is not allowed')
        obj.__setstate__(state)
    dispatch[pickle.BUILD[0]] = load_build


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
        raise OfficialPickleError(f'{source}: cannot be read safely: {error_summary(e)}') from e
    except Exception as e:          # EOFError, TypeError, MemoryError, ... from a damaged file or bad arguments
        raise OfficialPickleError(f'{source}: truncated or corrupt network pickle ({type(e).__name__}: {error_summary(e)})') from e
    problem = structure_problem(data)
    if problem:
        raise OfficialPickleError(f'{source}: cannot be read safely: {problem}')
    if not isinstance(data, dict):
        raise OfficialPickleError(f'{source}: expected a dict of networks, found {type(data).__name__}')
    return _finish_records(data)
