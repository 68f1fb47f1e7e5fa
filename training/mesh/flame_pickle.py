"""Loading FLAME-format model files without executing code and without chumpy or scipy.

FLAME's `generic_model.pkl` is a Python-2 era pickle: some arrays are chumpy `Ch` objects
(their value lives in the pickled state, under 'x'), `J_regressor` is a scipy sparse
matrix. DECA's `landmark_embedding.npy` is an `np.save`d dict, i.e. a pickle inside an
.npy container. Both are read with `RestrictedUnpickler`, which resolves only an
allow-list of globals: numpy array/dtype reconstruction, and stand-ins for chumpy and
scipy.sparse classes that keep nothing but arrays. Any other global (os.system, eval,
an arbitrary class) is refused before it can be called, with an error naming the file.
"""

import ast
import io
import pickle
import struct
from typing import Dict

import numpy as np


class _ChumpyArray:
    """Stand-in for chumpy `Ch` (and its subclasses): keeps only the wrapped array."""

    def __setstate__(self, state):
        if not isinstance(state, dict) or 'x' not in state:
            raise pickle.UnpicklingError('chumpy object without an array under "x"')
        self.array = np.asarray(state['x'])


class _SparseMatrix:
    """Stand-in for scipy.sparse csc/csr matrices: rebuilt as a dense numpy array."""
    compressed_axis = None   # 1 for csc (column pointers), 0 for csr (row pointers)

    def __init__(self, *args, **kwargs):
        # Reached only through copyreg.__newobj__-style construction with no arguments.
        if args or kwargs:
            raise pickle.UnpicklingError('sparse matrix constructed with arguments')

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError('sparse matrix state is not a dict')
        shape = state.get('_shape', state.get('shape'))
        try:
            data = np.asarray(state['data'])
            indices = np.asarray(state['indices'], dtype=np.int64)
            indptr = np.asarray(state['indptr'], dtype=np.int64)
            rows, cols = (int(n) for n in shape)
        except (KeyError, TypeError, ValueError) as e:
            raise pickle.UnpicklingError(f'sparse matrix state is incomplete ({e})') from None
        n_major = cols if self.compressed_axis == 1 else rows
        if len(indptr) != n_major + 1 or indptr[-1] != len(data) or len(indices) != len(data):
            raise pickle.UnpicklingError('sparse matrix arrays are inconsistent')
        major = np.repeat(np.arange(n_major), np.diff(indptr))
        dense = np.zeros([rows, cols], dtype=data.dtype)
        if self.compressed_axis == 1:
            np.add.at(dense, (indices, major), data)
        else:
            np.add.at(dense, (major, indices), data)
        self.array = dense


class _CscMatrix(_SparseMatrix):
    compressed_axis = 1


class _CsrMatrix(_SparseMatrix):
    compressed_axis = 0


_STAND_INS = (_ChumpyArray, _CscMatrix, _CsrMatrix)


def _reconstructor(cls, base, state):
    """Safe copyreg._reconstructor: only for our stand-ins (Python 2 protocol 0/1 pickles)."""
    if cls not in _STAND_INS or base is not object:
        raise pickle.UnpicklingError(f'refused reconstruction of {cls!r}')
    return object.__new__(cls)


def _numpy_reconstruct(subtype, shape, dtype):
    """numpy's ndarray reconstruction (its state follows via __setstate__), ndarray only."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f'refused array subtype {subtype!r}')
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype, data=None):
    """numpy's scalar reconstruction for plain (non-object) dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError('refused numpy scalar of object dtype')
    if isinstance(data, str):               # Python 2 str read with encoding='latin1'
        data = data.encode('latin1')
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _frombuffer(buf, dtype, shape, order):
    """numpy's protocol-5 array reconstruction, for plain dtypes only."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError('refused array of object dtype from a buffer')
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _codecs_encode(text, encoding='utf-8', errors='strict'):
    """Python 3 protocol-2 pickles store bytes as _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError('refused _codecs.encode call')
    return text.encode(encoding, errors)


_ALLOWED = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('_codecs', 'encode'): _codecs_encode,
    ('copy_reg', '_reconstructor'): _reconstructor,
    ('copyreg', '_reconstructor'): _reconstructor,
    **{(f'{core}.multiarray', '_reconstruct'): _numpy_reconstruct for core in ('numpy.core', 'numpy._core')},
    **{(f'{core}.multiarray', 'scalar'): _numpy_scalar for core in ('numpy.core', 'numpy._core')},
    **{(f'{core}.numeric', '_frombuffer'): _frombuffer for core in ('numpy.core', 'numpy._core')},
    # object (for copyreg._reconstructor) and plain containers that protocol 0/1 pickles
    # build through their constructors.
    **{(mod, c.__name__): c for mod in ('__builtin__', 'builtins') for c in (object, set, frozenset, list, dict, tuple)},
    ('scipy.sparse.csc', 'csc_matrix'): _CscMatrix,
    ('scipy.sparse._csc', 'csc_matrix'): _CscMatrix,
    ('scipy.sparse.csr', 'csr_matrix'): _CsrMatrix,
    ('scipy.sparse._csr', 'csr_matrix'): _CsrMatrix,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only array-building globals; anything else raises.

    chumpy classes (any global under the `chumpy` package whose name starts with a capital
    letter, e.g. `chumpy.ch.Ch`) map onto a stand-in that keeps the array in its state.
    """

    def __init__(self, file, source_name: str):
        super().__init__(file, encoding='latin1')
        self.source_name = source_name

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module == 'chumpy' or module.startswith('chumpy.')) and name[:1].isupper():
            return _ChumpyArray
        raise pickle.UnpicklingError(f'{self.source_name}: refused to load global "{module}.{name}" '
                                     f'(only numpy arrays, chumpy arrays and sparse matrices are allowed)')

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f'{self.source_name}: refused persistent id {pid!r}')


def _unwrap(obj):
    """Replaces stand-ins by their arrays, recursively through dicts, lists and tuples."""
    if isinstance(obj, _STAND_INS):
        return obj.array
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(v) for v in obj)
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        flat = [_unwrap(v) for v in obj.reshape(-1)]
        if obj.ndim == 0:
            return flat[0]
        out = np.empty(obj.shape, dtype=object)
        out.reshape(-1)[:] = flat
        return out
    return obj


def restricted_load(data: bytes, source_name: str):
    """Unpickles `data` with `RestrictedUnpickler`; stand-ins become numpy arrays."""
    try:
        return _unwrap(RestrictedUnpickler(io.BytesIO(data), source_name).load())
    except pickle.UnpicklingError as e:
        msg = str(e)
        raise pickle.UnpicklingError(msg if msg.startswith(source_name) else f'{source_name}: {msg}') from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as e:
        raise pickle.UnpicklingError(f'{source_name}: corrupt or unsupported pickle ({type(e).__name__}: {e})') from None


# FLAME arrays: name -> (dtype, number of dimensions).
_FLAME_ARRAYS = {
    'v_template': (np.float32, 2),
    'shapedirs': (np.float32, 3),
    'posedirs': (np.float32, 3),
    'J_regressor': (np.float32, 2),
    'weights': (np.float32, 2),
    'kintree_table': (np.int64, 2),
    'f': (np.int64, 2),
}


def load_flame_pickle(path) -> Dict[str, np.ndarray]:
    """Reads a FLAME-format `generic_model.pkl` into plain numpy arrays, executing no code.

    Returns a dict with (V vertices, J joints, K blendshapes, F faces):
      v_template    (V, 3) float32, metres
      shapedirs     (V, 3, K) float32, shape components then expression components
      posedirs      (V, 3, (J-1)*9) float32 (FLAME stores it as (V, 3, 36))
      J_regressor   (J, V) float32, dense
      weights       (V, J) float32, skinning weights
      kintree_table (2, J) int64, row 0 = parent index (root's is any value), row 1 = joint id
      f             (F, 3) int64, triangle vertex indices
    and, when the file stores it, n_shape_components (int): how many of shapedirs'
    components are identity ones (FLAME's files do not say; FLAME 2020 uses 300).
    posedirs stored as ((J-1)*9, V*3) (SMPL's flattened layout) is reshaped.
    """
    path = str(path)
    with open(path, 'rb') as fp:
        model = restricted_load(fp.read(), path)
    if not isinstance(model, dict):
        raise ValueError(f'{path}: expected a dict of arrays, found {type(model).__name__}')
    out = {}
    for name, (dtype, ndim) in _FLAME_ARRAYS.items():
        if name not in model:
            raise ValueError(f'{path}: missing array "{name}"')
        try:
            arr = np.asarray(model[name])
            out[name] = arr.astype(dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f'{path}: "{name}" is not a numeric array ({e})') from None
    v = out['v_template']
    n_verts = len(v)
    if out['posedirs'].ndim == 2 and out['posedirs'].shape[1] == n_verts * 3:
        out['posedirs'] = out['posedirs'].T.reshape(n_verts, 3, -1)
    n_joints = out['kintree_table'].shape[1] if out['kintree_table'].ndim == 2 else -1
    expected = {
        'v_template': (n_verts, 3),
        'shapedirs': (n_verts, 3, None),
        'posedirs': (n_verts, 3, (n_joints - 1) * 9),
        'J_regressor': (n_joints, n_verts),
        'weights': (n_verts, n_joints),
        'kintree_table': (2, n_joints),
        'f': (None, 3),
    }
    for name, shape in expected.items():
        arr = out[name]
        if arr.ndim != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
            raise ValueError(f'{path}: "{name}" has shape {tuple(arr.shape)}, expected '
                             f'{tuple("*" if s is None else s for s in shape)}')
        if not np.isfinite(arr).all():
            raise ValueError(f'{path}: "{name}" holds non-finite values')
    if out['f'].min() < 0 or out['f'].max() >= n_verts:
        raise ValueError(f'{path}: face indices out of range [0, {n_verts})')
    if 'n_shape_components' in model:
        n = int(np.asarray(model['n_shape_components']))
        if not 0 <= n <= out['shapedirs'].shape[2]:
            raise ValueError(f'{path}: n_shape_components = {n} exceeds the {out["shapedirs"].shape[2]} components')
        out['n_shape_components'] = n
    return out


def read_npy_pickle(path):
    """Reads an .npy file that holds a pickled object (np.save of a dict) safely.

    Parses the .npy header itself and unpickles the payload with `RestrictedUnpickler`
    (np.load(allow_pickle=True) would run any code the file asks for). Plain numeric .npy
    files are returned as arrays.
    """
    path = str(path)
    with open(path, 'rb') as fp:
        data = fp.read()
    if data[:6] != b'\x93NUMPY':
        raise ValueError(f'{path}: not an .npy file')
    major = data[6]
    if major == 1:
        (header_len,), start = struct.unpack('<H', data[8:10]), 10
    elif major in (2, 3):
        (header_len,), start = struct.unpack('<I', data[8:12]), 12
    else:
        raise ValueError(f'{path}: unsupported .npy version {major}')
    try:
        header = ast.literal_eval(data[start:start + header_len].decode('latin1'))
        descr, fortran, shape = header['descr'], header['fortran_order'], tuple(header['shape'])
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
        raise ValueError(f'{path}: malformed .npy header ({e})') from None
    payload = data[start + header_len:]
    if descr == '|O':
        obj = restricted_load(payload, path)
        if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
            return obj.reshape(-1)[0]
        return obj
    dtype = np.dtype(descr)
    if dtype.hasobject:
        raise ValueError(f'{path}: structured dtype with objects is not supported')
    count = int(np.prod(shape)) if shape else 1
    if len(payload) < count * dtype.itemsize:
        raise ValueError(f'{path}: truncated array data')
    arr = np.frombuffer(payload, dtype=dtype, count=count)
    return arr.reshape(shape, order='F' if fortran else 'C').copy()


# DECA landmark embedding: key -> trailing shape (None = any size).
_EMBEDDING_KEYS = {
    'full_lmk_faces_idx': (np.int64, (1, 68)),
    'full_lmk_bary_coords': (np.float32, (1, 68, 3)),
    'static_lmk_faces_idx': (np.int64, (51,)),
    'static_lmk_bary_coords': (np.float32, (51, 3)),
    'dynamic_lmk_faces_idx': (np.int64, (None, 17)),
    'dynamic_lmk_bary_coords': (np.float32, (None, 17, 3)),
}


def load_landmark_embedding(path) -> Dict[str, np.ndarray]:
    """Reads DECA's `landmark_embedding.npy` (a pickled dict) into numpy arrays, safely.

    Returns the keys among `full_lmk_faces_idx (1, 68) int64`, `full_lmk_bary_coords
    (1, 68, 3) float32`, `static_lmk_faces_idx (51,)`, `static_lmk_bary_coords (51, 3)`,
    `dynamic_lmk_faces_idx (N, 17)`, `dynamic_lmk_bary_coords (N, 17, 3)` that the file
    holds (either the full pair or the static + dynamic pairs must be present). Other keys
    are passed through unchanged.
    """
    path = str(path)
    emb = read_npy_pickle(path)
    if not isinstance(emb, dict):
        raise ValueError(f'{path}: expected a pickled dict, found {type(emb).__name__}')
    out = dict(emb)
    for key, (dtype, shape) in _EMBEDDING_KEYS.items():
        if key not in emb:
            continue
        arr = np.asarray(emb[key])
        if arr.shape == shape[1:] and shape[0] == 1:          # tolerate a missing batch axis
            arr = arr[None]
        if arr.ndim != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
            raise ValueError(f'{path}: "{key}" has shape {tuple(arr.shape)}, expected '
                             f'{tuple("*" if s is None else s for s in shape)}')
        out[key] = arr.astype(dtype)
    has_full = 'full_lmk_faces_idx' in out and 'full_lmk_bary_coords' in out
    has_static = all(k in out for k in ('static_lmk_faces_idx', 'static_lmk_bary_coords',
                                        'dynamic_lmk_faces_idx', 'dynamic_lmk_bary_coords'))
    if not (has_full or has_static):
        raise ValueError(f'{path}: needs full_lmk_faces_idx/full_lmk_bary_coords or the static + dynamic keys')
    return out
