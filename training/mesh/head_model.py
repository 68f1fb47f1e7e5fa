"""The project's bundled procedural head model (FLAME file formats) and template helpers.

The files live in `data/head_model/` (built by
`dataset_preprocessing/head_model/make_head_model.py`): generic_model.pkl,
landmark_embedding.npy, head_template.obj, uv_face_eye_mask.png.
The template/mask helpers work for FLAME's own files too.
"""

import os
from typing import Optional, Tuple

import numpy as np
import torch

from training.mesh.flame import FlameModel
from training.mesh.obj_io import read_obj


def default_head_model_dir() -> str:
    """The bundled head model's folder: `<repository>/data/head_model`."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'data', 'head_model')


def load_head_model(device='cpu', model_dir: Optional[str] = None, n_shape: Optional[int] = None,
                    n_exp: Optional[int] = None, dtype: torch.dtype = torch.float32) -> FlameModel:
    """FlameModel of the bundled head model (or of FLAME-format files in `model_dir`), on `device`."""
    model_dir = default_head_model_dir() if model_dir is None else model_dir
    model = FlameModel(os.path.join(model_dir, 'generic_model.pkl'), os.path.join(model_dir, 'landmark_embedding.npy'),
                       n_shape=n_shape, n_exp=n_exp, dtype=dtype)
    return model.to(device)


def load_template(path) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A template OBJ with v/vt faces -> faces (F, 3) int64, uvcoords (T, 2) float32, uvfaces (F, 3) int64.

    uvcoords are as stored in the file: u right, v up, both in [0, 1] (texture image row 0
    is v = 1). Raises ValueError naming the file if it has no texture coordinates.
    """
    mesh = read_obj(path)
    if mesh.vt is None or mesh.ft is None:
        raise ValueError(f'{path}: template needs texture coordinates (vt) and v/vt face indices')
    return torch.from_numpy(mesh.f), torch.from_numpy(mesh.vt), torch.from_numpy(mesh.ft)


def load_uv_mask(path, size: Optional[int] = 256) -> torch.Tensor:
    """Face/eye UV mask image -> (H, W) float32 tensor in [0, 1] (1 = face/eye texture).

    Row 0 is the top of the texture (v = 1). Colour images use their luminance. With `size`
    set, a different resolution is an error naming the file; size=None accepts any.
    Unreadable files raise ValueError naming the file.
    """
    from PIL import Image
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert('L') if img.mode not in ('L', 'I', 'F', 'I;16') else img, dtype=np.float32)
    except OSError as e:
        raise ValueError(f'{path}: cannot read the UV mask image ({e})') from e
    if size is not None and arr.shape != (size, size):
        raise ValueError(f'{path}: expected a {size}x{size} mask, got {arr.shape[1]}x{arr.shape[0]}')
    peak = 255.0 if arr.max() > 1 else 1.0
    return torch.from_numpy(arr / peak).clamp(0, 1)
