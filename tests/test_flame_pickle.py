"""Restricted loading of FLAME-format pickles and DECA landmark embeddings."""

import io
import os
import pickle
import sys
import types

import numpy as np
import pytest

from training.mesh.flame_pickle import load_flame_pickle, load_landmark_embedding, read_npy_pickle, restricted_load


def _flame_arrays(n_verts=6, n_comp=4):
    rng = np.random.default_rng(0)
    weights = rng.random((n_verts, 5))
    return {
        'v_template': rng.normal(size=(n_verts, 3)),
        'shapedirs': rng.normal(size=(n_verts, 3, n_comp)),
        'posedirs': rng.normal(size=(n_verts, 3, 36)),
        'J_regressor': rng.random((5, n_verts)),
        'weights': weights / weights.sum(1, keepdims=True),
        'kintree_table': np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),
        'f': np.array([[0, 1, 2], [2, 3, 4], [3, 4, 5]], dtype=np.uint32),
    }


class _Payload:
    """Unpickling this would create a marker file (a stand-in for running arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


class _SystemCall:
    def __reduce__(self):
        return (os.system, ('echo should-not-run',))


def test_code_execution_is_refused(tmp_path):
    marker = tmp_path / 'marker.txt'
    arrays = _flame_arrays()
    arrays['payload'] = _Payload(str(marker))
    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps(arrays, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r'evil\.pkl: refused to load global "(_?io|builtins)\.open"'):
        load_flame_pickle(tmp_path / 'evil.pkl')
    assert not marker.exists()
    (tmp_path / 'system.pkl').write_bytes(pickle.dumps({'x': _SystemCall()}))
    with pytest.raises(pickle.UnpicklingError, match=r'system\.pkl: refused to load global "(posix|nt|os)\.system"'):
        load_flame_pickle(tmp_path / 'system.pkl')


def test_refused_payload_inside_npy(tmp_path):
    marker = tmp_path / 'marker.txt'
    buf = io.BytesIO()
    np.save(buf, np.array({'full_lmk_faces_idx': _Payload(str(marker))}, dtype=object), allow_pickle=True)
    (tmp_path / 'emb.npy').write_bytes(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError, match=r'emb\.npy: refused'):
        load_landmark_embedding(tmp_path / 'emb.npy')
    assert not marker.exists()


def _pickle_with_fake_chumpy_and_scipy(arrays, protocol):
    """Pickles `arrays` with shapedirs/posedirs as a fake `chumpy.ch.Ch` and J_regressor as a
    scipy csc matrix; the fake module exists only while pickling."""
    import scipy.sparse
    chumpy, ch = types.ModuleType('chumpy'), types.ModuleType('chumpy.ch')

    class Ch:
        def __init__(self, x):
            self.x = x
            self._dirty_vars = set()
    Ch.__module__, Ch.__qualname__ = 'chumpy.ch', 'Ch'
    ch.Ch = Ch
    chumpy.ch = ch
    sys.modules['chumpy'], sys.modules['chumpy.ch'] = chumpy, ch
    try:
        obj = dict(arrays)
        obj['shapedirs'] = Ch(arrays['shapedirs'])
        obj['posedirs'] = Ch(arrays['posedirs'])
        obj['J_regressor'] = scipy.sparse.csc_matrix(arrays['J_regressor'])
        return pickle.dumps(obj, protocol=protocol)
    finally:
        del sys.modules['chumpy'], sys.modules['chumpy.ch']


@pytest.mark.parametrize('protocol', [0, 2, 4])
def test_fake_chumpy_pickle_loads_as_arrays(tmp_path, protocol):
    arrays = _flame_arrays()
    arrays['J_regressor'][arrays['J_regressor'] < 0.5] = 0      # genuinely sparse
    (tmp_path / 'generic_model.pkl').write_bytes(_pickle_with_fake_chumpy_and_scipy(arrays, protocol))
    assert 'chumpy' not in sys.modules
    model = load_flame_pickle(tmp_path / 'generic_model.pkl')
    for name in ('v_template', 'shapedirs', 'posedirs', 'J_regressor', 'weights'):
        assert model[name].dtype == np.float32
        np.testing.assert_allclose(model[name], arrays[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(model['f'], arrays['f'])
    assert model['kintree_table'][1].tolist() == [0, 1, 2, 3, 4]
    assert model['kintree_table'].dtype == np.int64


def test_sparse_csr_rebuilt_dense():
    import scipy.sparse
    dense = np.array([[0, 2.0, 0], [1.0, 0, 3.0]])
    out = restricted_load(pickle.dumps({'a': scipy.sparse.csr_matrix(dense), 'b': scipy.sparse.csc_matrix(dense)}), 'm')
    np.testing.assert_array_equal(out['a'], dense)
    np.testing.assert_array_equal(out['b'], dense)


def test_shape_errors_name_the_file(tmp_path):
    arrays = _flame_arrays()
    arrays['weights'] = arrays['weights'][:, :4]
    (tmp_path / 'm.pkl').write_bytes(pickle.dumps(arrays))
    with pytest.raises(ValueError, match=r'm\.pkl: "weights" has shape \(6, 4\), expected \(6, 5\)'):
        load_flame_pickle(tmp_path / 'm.pkl')
    del arrays['weights']
    (tmp_path / 'm.pkl').write_bytes(pickle.dumps(arrays))
    with pytest.raises(ValueError, match=r'm\.pkl: missing array "weights"'):
        load_flame_pickle(tmp_path / 'm.pkl')
    (tmp_path / 't.pkl').write_bytes(pickle.dumps(_flame_arrays())[:50])
    with pytest.raises(pickle.UnpicklingError, match=r't\.pkl: (corrupt|pickle data was truncated)'):
        load_flame_pickle(tmp_path / 't.pkl')


def test_landmark_embedding_round_trip(tmp_path):
    emb = {
        'full_lmk_faces_idx': np.arange(68)[None],
        'full_lmk_bary_coords': np.full((1, 68, 3), 1 / 3),
        'static_lmk_faces_idx': np.arange(51),
        'static_lmk_bary_coords': np.full((51, 3), 1 / 3),
        'dynamic_lmk_faces_idx': np.zeros((79, 17), dtype=np.int64),
        'dynamic_lmk_bary_coords': np.full((79, 17, 3), 1 / 3),
    }
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=True)
    (tmp_path / 'e.npy').write_bytes(buf.getvalue())
    out = load_landmark_embedding(tmp_path / 'e.npy')
    for k, v in emb.items():
        np.testing.assert_allclose(out[k], v, rtol=1e-6)
    assert out['full_lmk_faces_idx'].dtype == np.int64 and out['full_lmk_bary_coords'].dtype == np.float32
    # A plain numeric .npy reads back as an array, through the same safe path.
    buf = io.BytesIO()
    np.save(buf, np.arange(6.0).reshape(2, 3))
    (tmp_path / 'plain.npy').write_bytes(buf.getvalue())
    np.testing.assert_array_equal(read_npy_pickle(tmp_path / 'plain.npy'), np.arange(6.0).reshape(2, 3))
    # Missing keys and wrong shapes are errors naming the file.
    buf = io.BytesIO()
    np.save(buf, {'full_lmk_faces_idx': np.arange(60)[None]}, allow_pickle=True)
    (tmp_path / 'bad.npy').write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r'bad\.npy: "full_lmk_faces_idx" has shape \(1, 60\)'):
        load_landmark_embedding(tmp_path / 'bad.npy')
