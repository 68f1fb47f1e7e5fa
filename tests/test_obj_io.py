"""OBJ and landmark file I/O: round trips, index forms, polygons, clear errors."""

import numpy as np
import pytest

from training.mesh.obj_io import read_landmarks, read_obj, read_obj_vertices, write_landmarks, write_obj


def _mesh(n_v=7, n_t=9, n_f=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_v, 3)).astype(np.float32), rng.integers(0, n_v, (n_f, 3)),
            rng.random((n_t, 2)).astype(np.float32), rng.integers(0, n_t, (n_f, 3)))


def test_round_trip_with_uvs(tmp_path):
    v, f, vt, ft = _mesh()
    write_obj(tmp_path / 'm.obj', v, f, vt, ft)
    m = read_obj(tmp_path / 'm.obj')
    assert m.v.dtype == np.float32 and m.f.dtype == np.int64 and m.ft.dtype == np.int64
    np.testing.assert_allclose(m.v, v, atol=1e-6)
    np.testing.assert_allclose(m.vt, vt, atol=1e-6)
    np.testing.assert_array_equal(m.f, f)
    np.testing.assert_array_equal(m.ft, ft)
    np.testing.assert_allclose(read_obj_vertices(tmp_path / 'm.obj', expected_count=7), v, atol=1e-6)


def test_round_trip_without_uvs(tmp_path):
    v, f, _, _ = _mesh()
    write_obj(tmp_path / 'm.obj', v, f)
    m = read_obj(tmp_path / 'm.obj')
    assert m.vt is None and m.ft is None
    np.testing.assert_array_equal(m.f, f)


HEADER = 'v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nvn 0 0 1\n'


@pytest.mark.parametrize('face, has_uv', [
    ('f 1 2 3\nf 1 3 4\n', False),
    ('f 1/1 2/2 3/3\nf 1/1 3/3 4/4\n', True),
    ('f 1/1/1 2/2/1 3/3/1\nf 1/1/1 3/3/1 4/4/1\n', True),
    ('f 1//1 2//1 3//1\nf 1//1 3//1 4//1\n', False),
])
def test_face_index_forms(tmp_path, face, has_uv):
    (tmp_path / 'm.obj').write_text('# comment\ng group\n' + HEADER + face)
    m = read_obj(tmp_path / 'm.obj')
    np.testing.assert_array_equal(m.f, [[0, 1, 2], [0, 2, 3]])
    if has_uv:
        np.testing.assert_array_equal(m.ft, [[0, 1, 2], [0, 2, 3]])
    else:
        assert m.ft is None


def test_polygons_are_fan_triangulated(tmp_path):
    (tmp_path / 'm.obj').write_text(HEADER + 'v 0.5 1.5 0\nf 1/1 2/2 3/3 5/4 4/4\nf 1/1 2/2 3/3\n')
    m = read_obj(tmp_path / 'm.obj')
    np.testing.assert_array_equal(m.f, [[0, 1, 2], [0, 2, 4], [0, 4, 3], [0, 1, 2]])
    np.testing.assert_array_equal(m.ft, [[0, 1, 2], [0, 2, 3], [0, 3, 3], [0, 1, 2]])


def test_ragged_vertex_records(tmp_path):
    (tmp_path / 'm.obj').write_text('v 0 0 0 1 0 0\nv 1 0 0\nv 1 1 0 0.5 0.5 0.5\nf 1 2 3\n')
    np.testing.assert_array_equal(read_obj(tmp_path / 'm.obj').v, [[0, 0, 0], [1, 0, 0], [1, 1, 0]])


@pytest.mark.parametrize('text, message', [
    (HEADER + 'f 1/1 2/2 3\n', 'mix index forms'),
    (HEADER + 'f 1 2 9\n', 'face 1 uses vertex 9 but the file has 4 vertices'),
    (HEADER + 'f 1 2 3\nf 1 2 9\n', 'face 2 uses vertex 9 but the file has 4 vertices'),
    (HEADER + 'f 1 2 3 9\n', 'face 1 uses vertex 9 but the file has 4 vertices'),
    (HEADER + 'f 1/1 2/2 3/9\n', 'face 1 uses texture coordinate 9 but the file has 4 texture coordinates'),
    (HEADER + 'f -1 -2 -3\n', 'positive'),
    (HEADER + 'f 1 2\n', 'fewer than three'),
    ('v 0 0 zero\n', 'malformed'),
    ('v 0 0 nan\n', 'non-finite'),
    ('v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1/1 2/2 3/3\n', 'no "vt"'),
])
def test_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / 'bad.obj'
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        read_obj(path)
    assert 'bad.obj' in str(e.value)


def test_vertex_reader_checks_faces_when_asked(tmp_path):
    path = tmp_path / 'm.obj'
    path.write_text(HEADER + 'f 1 2 3\nf 1 2 9\n')
    assert read_obj_vertices(path).shape == (4, 3)        # datasets: faces are never used, not parsed
    with pytest.raises(ValueError, match=r'm\.obj: face 2 uses vertex 9 but the file has 4 vertices'):
        read_obj_vertices(path, check_faces=True)


def test_vertex_count_check(tmp_path):
    v, f, _, _ = _mesh()
    write_obj(tmp_path / 'm.obj', v, f)
    with pytest.raises(ValueError, match=r'm\.obj: expected 5023 vertices, found 7'):
        read_obj_vertices(tmp_path / 'm.obj', expected_count=5023)


def test_landmarks_round_trip_and_errors(tmp_path):
    lms = np.random.default_rng(1).normal(size=(68, 3)).astype(np.float32)
    write_landmarks(tmp_path / 'l.txt', lms)
    np.testing.assert_allclose(read_landmarks(tmp_path / 'l.txt'), lms, atol=1e-6)
    assert len((tmp_path / 'l.txt').read_text().splitlines()) == 68
    (tmp_path / 'short.txt').write_text('1 2 3\n' * 67)
    with pytest.raises(ValueError, match='short.txt: expected 68 x 3'):
        read_landmarks(tmp_path / 'short.txt')
    (tmp_path / 'nan.txt').write_text('1 2 3\n' * 67 + 'nan 2 3\n')
    with pytest.raises(ValueError, match='nan.txt: .*non-finite'):
        read_landmarks(tmp_path / 'nan.txt')
    (tmp_path / 'word.txt').write_text('1 2 3\n' * 67 + 'a 2 3\n')
    with pytest.raises(ValueError, match='word.txt'):
        read_landmarks(tmp_path / 'word.txt')
    with pytest.raises(ValueError, match='shape'):
        write_landmarks(tmp_path / 'x.txt', lms[:10])
    with pytest.raises(ValueError, match='non-finite'):
        write_landmarks(tmp_path / 'x.txt', np.full((68, 3), np.inf))


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    v, f, _, _ = _mesh()
    write_obj(tmp_path / 'm.obj', v, f)
    write_obj(tmp_path / 'm.obj', v * 2, f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.obj']
    np.testing.assert_allclose(read_obj(tmp_path / 'm.obj').v, v * 2, atol=1e-6)


def test_crlf_tabs_and_other_records(tmp_path):
    text = 'mtllib m.mtl\r\no head\r\nv\t0 0 0\r\nv 1 0 0\r\nv 1 1 0\r\nvn 0 0 1\r\nvt 0 0\r\nvt 1 0\r\nvt 1 1\r\n' \
           'usemtl skin\r\ns off\r\nf 1/1 2/2 3/3\r\nl 1 2\r\n'
    (tmp_path / 'm.obj').write_bytes(text.encode())
    m = read_obj(tmp_path / 'm.obj')
    np.testing.assert_array_equal(m.v, [[0, 0, 0], [1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(m.f, [[0, 1, 2]])
    np.testing.assert_array_equal(m.ft, [[0, 1, 2]])
