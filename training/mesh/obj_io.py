"""Wavefront OBJ meshes and 68-point landmark files.

OBJ indices are 1-based in the file and 0-based in memory. Only what the project needs is
read: `v` (positions), `vt` (texture coordinates) and `f` (faces); normals, groups and
materials are ignored. Faces are parsed with vectorised numpy code (one `split` per
record type), so a FLAME-sized mesh (5023 vertices, 9976 faces) parses in milliseconds.

Polygons with more than three corners are triangulated as a fan around their first
corner (a, b, c), (a, c, d), ... Negative (relative) indices are rejected with an error.
"""

import dataclasses
import io
import warnings
from typing import Optional

import numpy as np

from torch_utils.persistence import atomic_write_bytes


@dataclasses.dataclass
class ObjMesh:
    """A triangle mesh as stored in an OBJ file.

    v:  (V, 3) float32 vertex positions.
    f:  (F, 3) int64 vertex indices of each triangle, 0-based.
    vt: (T, 2) float32 texture coordinates (u right, v up, as in the file), or None.
    ft: (F, 3) int64 texture-coordinate indices of each triangle corner, or None.
    """
    v: np.ndarray
    f: np.ndarray
    vt: Optional[np.ndarray] = None
    ft: Optional[np.ndarray] = None


def _read_bytes(path) -> bytes:
    with open(path, 'rb') as fp:
        return fp.read()


def _records(data: bytes, tag: bytes):
    """Blocks of consecutive lines that start with `tag` + whitespace, tag removed.

    Returns a list of byte strings, one per block of consecutive records (OBJ writers
    group records, so there are few blocks), and the number of records. Works on the raw
    bytes with numpy so that no Python loop runs per line.
    """
    arr = np.frombuffer(data + b'\n  ', dtype=np.uint8)     # padding: safe look-ahead
    starts = np.concatenate([[0], np.flatnonzero(arr[:len(data)] == 10) + 1])
    starts = starts[starts < len(data)]
    match = np.ones(len(starts), dtype=bool)
    for k, ch in enumerate(tag):
        match &= arr[starts + k] == ch
    after = arr[starts + len(tag)]
    match &= (after == 32) | (after == 9)
    lines = np.flatnonzero(match)
    if len(lines) == 0:
        return [], 0
    breaks = np.flatnonzero(np.diff(lines) != 1)
    first = lines[np.concatenate([[0], breaks + 1])]
    last = lines[np.concatenate([breaks, [len(lines) - 1]])]
    ends = np.concatenate([starts[1:], [len(data)]])
    blocks = []
    for a, b in zip(first, last):
        block = data[starts[a]:ends[b]]
        # Delete the tag letters; they never occur inside numbers (e, nan, inf have none).
        blocks.append(block.translate(None, tag))
    return blocks, len(lines)


def _tokens_per_line(block: bytes) -> np.ndarray:
    """Number of whitespace-separated tokens on each line of `block` (vectorised)."""
    arr = np.frombuffer(block.rstrip(b'\r\n') + b'\n', dtype=np.uint8)
    newline = arr == 10
    space = newline | (arr == 32) | (arr == 9) | (arr == 13)
    token_start = ~space & np.concatenate([[True], space[:-1]])
    newlines = np.flatnonzero(newline)
    line_of_token = np.searchsorted(newlines, np.flatnonzero(token_start))
    return np.bincount(line_of_token, minlength=len(newlines))


def _numbers(path, text, dtype, tag: str) -> np.ndarray:
    """Whitespace-separated numbers -> 1-D array, parsed in C; junk raises ValueError."""
    with warnings.catch_warnings():
        # numpy reports trailing unparsable text with a DeprecationWarning: make it an error.
        warnings.simplefilter('error', DeprecationWarning)
        try:
            return np.fromstring(text, dtype=dtype, sep=' ')
        except (ValueError, DeprecationWarning):
            raise ValueError(f'{path}: malformed "{tag}" record') from None


def _parse_floats(path, blocks, n: int, tag: str, width: int) -> np.ndarray:
    """`n` records in `blocks` (lines of numbers) -> (n, width) float32 (extra numbers dropped)."""
    if n == 0:
        return np.zeros([0, width], dtype=np.float32)
    values = _numbers(path, b' '.join(blocks), np.float64, tag)
    counts = np.concatenate([_tokens_per_line(b) for b in blocks])
    if len(counts) != n:
        raise ValueError(f'{path}: malformed "{tag}" record')
    if (counts < width).any():
        raise ValueError(f'{path}: every "{tag}" record needs at least {width} numbers')
    if (counts == counts[0]).all():
        values = values.reshape(n, -1)[:, :width]
    else:
        # Ragged records (e.g. only some `v` lines carry vertex colours).
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        values = values[offsets[:, None] + np.arange(width)]
    if not np.isfinite(values).all():
        raise ValueError(f'{path}: non-finite value in a "{tag}" record')
    return values.astype(np.float32)


def _parse_faces(path, blocks, n: int, num_v: int, num_vt: int):
    """`n` face records in `blocks` -> (F, 3) vertex indices, (F, 3) uv indices or None.

    Every index is checked against the file's `num_v` vertices and `num_vt` texture
    coordinates; the error names the face record (1-based, in file order).
    """
    if n == 0:
        return np.zeros([0, 3], dtype=np.int64), None
    first = blocks[0][:blocks[0].find(b'\n')].split()[0]
    slashes, double = first.count(b'/'), b'//' in first
    has_uv = slashes >= 1 and not double
    per_corner = 1 + int(has_uv) + int(slashes == 2)   # numbers per corner: v[, vt][, vn]
    corners = np.concatenate([_tokens_per_line(b) for b in blocks])
    if len(corners) != n:
        raise ValueError(f'{path}: malformed face record')
    n_tokens = int(corners.sum())
    text = b' '.join(blocks)
    if text.count(b'/') != n_tokens * slashes or text.count(b'//') != (n_tokens if double else 0):
        raise ValueError(f'{path}: faces mix index forms (v, v/vt, v/vt/vn, v//vn); use one form')
    numbers = _numbers(path, text.replace(b'//', b' ').replace(b'/', b' '), np.int64, 'f')
    if numbers.size != n_tokens * per_corner:
        raise ValueError(f'{path}: malformed face record')
    numbers = numbers.reshape(n_tokens, per_corner)
    if (numbers[:, :1 + int(has_uv)] <= 0).any():
        raise ValueError(f'{path}: face indices must be positive (relative indices are not supported)')
    if (corners < 3).any():
        raise ValueError(f'{path}: a face record has fewer than three corners')
    if has_uv and num_vt == 0:
        raise ValueError(f'{path}: faces have texture indices but the file has no "vt" records')
    checks = [(0, num_v, 'vertex', 'vertices')] + ([(1, num_vt, 'texture coordinate', 'texture coordinates')] if has_uv else [])
    for column, count, what, plural in checks:
        bad = np.flatnonzero(numbers[:, column] > count)
        if len(bad):
            face = int(np.searchsorted(np.cumsum(corners), bad[0], side='right')) + 1
            raise ValueError(f'{path}: face {face} uses {what} {numbers[bad[0], column]} but the file has {count} {plural}')
    vidx, uvidx = numbers[:, 0] - 1, (numbers[:, 1] - 1 if has_uv else None)
    if (corners == 3).all():
        f = vidx.reshape(-1, 3)
        ft = uvidx.reshape(-1, 3) if has_uv else None
        return f, ft
    # Polygons: fan triangulation (a, b, c), (a, c, d), ...
    starts = np.concatenate([[0], np.cumsum(corners)[:-1]])
    tri_face = np.repeat(np.arange(len(corners)), corners - 2)
    tri_k = np.arange(len(tri_face)) - np.repeat(np.cumsum(corners - 2) - (corners - 2), corners - 2)
    a = starts[tri_face]
    sel = np.stack([a, a + tri_k + 1, a + tri_k + 2], axis=1)
    return vidx[sel], (uvidx[sel] if has_uv else None)


def read_obj(path) -> ObjMesh:
    """Reads positions, texture coordinates and triangles of an OBJ file.

    Raises ValueError naming the file for malformed records, mixed face index forms,
    indices out of range (`<file>: face N uses vertex K but the file has V vertices`), and
    uv indices without `vt` records.
    """
    data = _read_bytes(path)
    v = _parse_floats(path, *_records(data, b'v'), 'v', 3)
    vt_blocks, n_vt = _records(data, b'vt')
    vt = _parse_floats(path, vt_blocks, n_vt, 'vt', 2) if n_vt else None
    f, ft = _parse_faces(path, *_records(data, b'f'), num_v=len(v), num_vt=n_vt)
    return ObjMesh(v=v, f=f, vt=vt, ft=ft)


def read_obj_vertices(path, expected_count: Optional[int] = None, check_faces: bool = False) -> np.ndarray:
    """Only the `v` records of an OBJ file: (V, 3) float32. The fast path for datasets.

    expected_count: if given, a different vertex count raises ValueError naming the file.
    check_faces: also parse the `f` records and refuse indices of missing vertices or texture
    coordinates, as `read_obj` does (a damaged file; for meshes a user names - dataset
    meshes skip it, their faces are never used).
    """
    data = _read_bytes(path)
    v = _parse_floats(path, *_records(data, b'v'), 'v', 3)
    if check_faces:
        _parse_faces(path, *_records(data, b'f'), num_v=len(v), num_vt=_records(data, b'vt')[1])
    if expected_count is not None and len(v) != expected_count:
        raise ValueError(f'{path}: expected {expected_count} vertices, found {len(v)}')
    return v


def write_obj(path, v: np.ndarray, f: Optional[np.ndarray] = None, vt: Optional[np.ndarray] = None,
              ft: Optional[np.ndarray] = None) -> None:
    """Writes an OBJ file atomically. v (V,3); f, ft (F,3) 0-based; vt (T,2).

    With both f and ft the faces are written as `f a/b c/d e/f`; ft requires f and vt.
    Floats are written with 6 decimals (micrometre precision for metre-scale meshes).
    """
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f'{path}: vertices must have shape (V, 3), got {tuple(v.shape)}')
    if ft is not None and (f is None or vt is None):
        raise ValueError(f'{path}: texture indices need both faces and texture coordinates')
    out = io.StringIO()
    np.savetxt(out, v, fmt='v %.6f %.6f %.6f')
    if vt is not None:
        np.savetxt(out, np.asarray(vt, dtype=np.float64).reshape(-1, 2), fmt='vt %.6f %.6f')
    if f is not None:
        f = np.asarray(f, dtype=np.int64).reshape(-1, 3) + 1
        if ft is None:
            np.savetxt(out, f, fmt='f %d %d %d')
        else:
            ft = np.asarray(ft, dtype=np.int64).reshape(-1, 3) + 1
            if len(ft) != len(f):
                raise ValueError(f'{path}: {len(f)} faces but {len(ft)} texture-index triples')
            np.savetxt(out, np.stack([f, ft], axis=2).reshape(-1, 6), fmt='f %d/%d %d/%d %d/%d')
    atomic_write_bytes(path, out.getvalue().encode('utf-8'))


def read_landmarks(path) -> np.ndarray:
    """A 68-landmark file (one 'x y z' line per point, whitespace separated) -> (68, 3) float32."""
    values = _numbers(path, _read_bytes(path), np.float64, 'landmark')
    if values.size != 68 * 3:
        raise ValueError(f'{path}: expected 68 x 3 = 204 numbers, found {values.size}')
    if not np.isfinite(values).all():
        raise ValueError(f'{path}: landmark file holds non-finite values')
    return values.reshape(68, 3).astype(np.float32)


def write_landmarks(path, lms: np.ndarray) -> None:
    """Writes (68, 3) landmarks, one point per line, atomically."""
    lms = np.asarray(lms, dtype=np.float64)
    if lms.shape != (68, 3):
        raise ValueError(f'{path}: landmarks must have shape (68, 3), got {tuple(lms.shape)}')
    if not np.isfinite(lms).all():
        raise ValueError(f'{path}: landmarks hold non-finite values')
    out = io.StringIO()
    np.savetxt(out, lms, fmt='%.6f')
    atomic_write_bytes(path, out.getvalue().encode('utf-8'))
