"""What drives a generator: a mesh + landmarks condition, and tracked-video driving folders.

A condition `v` is (B, V + 68, 3) float32: the canonical mesh vertices (metres, head
rotation removed) followed by the 68 iBUG landmarks in the same space.

A driving folder (reenactment) holds `dataset.json` = {"labels": [[frame file, 25 floats],
...]}, the frames, and per frame `<id>.obj` and `<id>_kpt2d.txt` (68 x 3), where <id> is
the frame file's name without extension.
"""

import json
import os
from typing import List, NamedTuple

import numpy as np
import torch

from training.mesh.obj_io import read_landmarks, read_obj_vertices

BUNDLED_HEAD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'head_model')
DEFAULT_OBJ = os.path.join(BUNDLED_HEAD_DIR, 'neutral.obj')
DEFAULT_LMS = os.path.join(BUNDLED_HEAD_DIR, 'neutral_lms.txt')


def load_condition(obj_path: str, lms_path: str = None, num_vertices: int = None, landmarks_fn=None) -> torch.Tensor:
    """Read a mesh and its landmarks -> (1, V + 68, 3) float32.

    lms_path: the 68 x 3 landmark file; if None, `landmarks_fn(vertices (1, V, 3)) -> (1, 68, 3)`
    computes them from the mesh (e.g. with the head model's landmark embedding).
    num_vertices: the generator's vertex count; a mesh with another count is an error
    naming the file.
    """
    if not os.path.isfile(obj_path):
        raise FileNotFoundError(f'{obj_path}: no such mesh file')
    verts = torch.from_numpy(read_obj_vertices(obj_path, expected_count=num_vertices, check_faces=True))[None]
    if lms_path is not None:
        if not os.path.isfile(lms_path):
            raise FileNotFoundError(f'{lms_path}: no such landmark file')
        lms = torch.from_numpy(read_landmarks(lms_path))[None]
    elif landmarks_fn is not None:
        lms = landmarks_fn(verts).to(verts.dtype)
    else:
        raise ValueError(f'{obj_path}: no landmarks given and no way to compute them from the mesh')
    return torch.cat([verts, lms], dim=1)


INNER_LIPS = (62, 66)       # the landmarks whose distance is the mouth's opening


def lip_opening(lms: torch.Tensor) -> torch.Tensor:
    """(..., 68, 3) landmarks -> (...) distance of the inner-lip landmarks 62 and 66 (mesh units)."""
    return (lms[..., INNER_LIPS[0], :] - lms[..., INNER_LIPS[1], :]).norm(dim=-1)


class DrivingFrame(NamedTuple):
    frame_id: str
    image_path: str
    label: np.ndarray          # (25,) float32
    obj_path: str
    lms_path: str


def read_driving_folder(root: str) -> List[DrivingFrame]:
    """List a driving folder's frames in file order, checking every file exists up front."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{root}: driving folder does not exist')
    json_path = os.path.join(root, 'dataset.json')
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f'{json_path}: a driving folder needs dataset.json with a camera label per frame')
    try:
        with open(json_path) as f:
            labels = json.load(f)['labels']
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{json_path}: expected {{"labels": [[frame, [25 floats]], ...]}} ({e})') from e
    if not isinstance(labels, list) or not labels:
        raise ValueError(f'{json_path}: no frames listed (expected {{"labels": [[frame, [25 floats]], ...]}})')
    entries = []
    for i, entry in enumerate(labels):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f'{json_path}: entry {i + 1} is not [frame file, [25 numbers]]')
        name = entry[0]
        if os.path.isabs(name) or '..' in name.replace('\\', '/').split('/'):
            raise ValueError(f'{json_path}: frame {name} is not a path inside the driving folder')
        try:
            label = np.asarray(entry[1], dtype=np.float32)
        except (TypeError, ValueError):
            label = None
        if label is None or label.shape != (25,) or not np.isfinite(label).all():
            raise ValueError(f'{json_path}: label of {name} is not 25 finite numbers')
        entries.append((name, label))
    frames = []
    for name, label in sorted(entries, key=lambda e: e[0]):
        frame_id = os.path.splitext(os.path.basename(name))[0]
        frame = DrivingFrame(frame_id, os.path.join(root, name), label,
                             os.path.join(root, f'{frame_id}.obj'), os.path.join(root, f'{frame_id}_kpt2d.txt'))
        for path in (frame.image_path, frame.obj_path, frame.lms_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f'{path}: missing (listed as frame {name} in {json_path})')
        frames.append(frame)
    return frames


def smooth_labels(labels: np.ndarray, radius: int = 2) -> np.ndarray:
    """Average each frame's camera with its neighbours within `radius` (ends use the frames that exist).

    labels (N, 25) -> (N, 25); the rotation part is re-orthonormalised so it stays a rotation.
    """
    n = len(labels)
    out = np.empty_like(labels)
    for i in range(n):
        lo, hi = max(0, i - radius), min(n, i + radius + 1)
        out[i] = labels[lo:hi].mean(0)
    rot = out[:, :16].reshape(n, 4, 4)[:, :3, :3]
    u, _, vt = np.linalg.svd(rot)
    fixed = out[:, :16].reshape(n, 4, 4).copy()
    fixed[:, :3, :3] = u @ vt
    out[:, :16] = fixed.reshape(n, 16)
    return out
