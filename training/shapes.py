"""Density volumes from a generator, saved as .mrc volumes or .ply / .obj surfaces; point clouds
(a Gaussian generator's centres) as .ply."""

import importlib
import math
from typing import Optional

import numpy as np
import torch

from torch_utils.persistence import atomic_output, atomic_write_bytes
from training.mesh.obj_io import write_obj
from training.volumetric_rendering.renderer import ray_box_intersection

EG3D_LEVEL = 10.0       # raw sigma at which EG3D views its volumes and extracts its surfaces
FRONT_COVER = 0.9       # the automatic level is reached by this fraction of the frontal view's central rays
SHAPE_FORMATS = ('.mrc', '.ply', '.obj')
# Modules each format needs -> the pip package that provides them (all in the `shapes` extra or core).
FORMAT_MODULES = {'.mrc': {'mrcfile': 'mrcfile'}, '.ply': {'skimage.measure': 'scikit-image'},
                  '.obj': {'skimage.measure': 'scikit-image'}}


def check_dependencies(shape_format: str):
    """Raise ImportError naming the pip packages `shape_format` needs, if any is missing."""
    missing = []
    for module, package in FORMAT_MODULES[shape_format].items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(f"{shape_format} shapes need {', '.join(missing)}: pip install -e '.[shapes]'")


def surface_level(density_max: float, requested: Optional[float] = None, front_reach: Optional[float] = None) -> float:
    """The iso-level of a surface: `requested`, or automatically min(10, density_max / 2, front_reach).

    10 is EG3D's level for its trained models. A model whose raw density peaks below 20 (a soft,
    barely trained one) gets at most its half-maximum surface: a level
    close to the maximum cuts out only specks. `front_reach` (see `front_reach`; ignored unless
    positive) lowers the level to one that FRONT_COVER of the frontal view's central rays
    reach, so the face is closed rather than cut into islands where its density is softer than
    its peak. Raises ValueError when the level is not below the maximum (no surface).
    """
    if requested is None:
        level = min(EG3D_LEVEL, density_max / 2)
        if front_reach is not None and front_reach > 0:
            level = min(level, front_reach)
    else:
        level = requested
    if not density_max > level:
        raise ValueError(f'the density never exceeds level {level:.4g} (its maximum is {density_max:.4g})')
    return level


@torch.no_grad()
def front_reach(sigma_fn, ray_origins: torch.Tensor, ray_directions: torch.Tensor, box_warp: float = 1.0,
                samples: int = 128, cover: float = FRONT_COVER) -> float:
    """The highest raw density that a fraction `cover` of the rays reach inside the tri-plane box.

    ray_origins, ray_directions [1, R, 3] (unit directions); each ray is sampled at `samples`
    evenly spaced depths from where it enters the box to where it leaves it. Returns the
    (1 - cover) quantile over the rays of each ray's maximum density (-inf for a ray that
    misses the box).
    """
    start, end, valid = ray_box_intersection(ray_origins, ray_directions, box_warp)             # [1, R, 1]
    t = start + (end - start) * torch.linspace(0, 1, samples, device=ray_origins.device)         # [1, R, S]
    points = ray_origins[:, :, None] + ray_directions[:, :, None] * t[..., None]                # [1, R, S, 3]
    sigma = sigma_fn(points.reshape(1, -1, 3)).reshape(points.shape[:3]).float()
    reach = sigma.amax(-1).masked_fill(~valid[..., 0], -math.inf).flatten()
    return float(torch.quantile(reach, 1 - cover, interpolation='lower'))


def grid_coordinates(resolution: int, box_warp: float = 1.0) -> torch.Tensor:
    """(N^3, 3) world points of a regular grid over the tri-plane box, index [i, j, k] -> (x_i, y_j, z_k)."""
    axis = torch.linspace(-box_warp / 2, box_warp / 2, resolution)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing='ij'), -1).reshape(-1, 3)


@torch.no_grad()
def sample_density_volume(sigma_fn, resolution: int, box_warp: float = 1.0, chunk: int = 2 ** 18,
                          device: torch.device = torch.device('cpu'), progress=None) -> np.ndarray:
    """Evaluate `sigma_fn(coords (1, n, 3)) -> (1, n, 1)` on an N^3 grid, chunk by chunk.

    Returns float32 (N, N, N) with [i, j, k] the density at (x_i, y_j, z_k). Only one chunk
    of coordinates lives on `device` at a time, so 512^3 fits anywhere the network fits.
    """
    n = resolution
    axis = torch.linspace(-box_warp / 2, box_warp / 2, n, device=device)
    volume = np.empty(n ** 3, dtype=np.float32)
    for start in range(0, n ** 3, chunk):
        idx = torch.arange(start, min(start + chunk, n ** 3), device=device)
        coords = torch.stack([axis[idx // (n * n)], axis[(idx // n) % n], axis[idx % n]], -1)
        sigma = sigma_fn(coords[None])
        volume[start:start + len(idx)] = sigma.reshape(-1).float().cpu().numpy()
        if progress is not None:
            progress.update(len(idx))
    return volume.reshape(n, n, n)


def prepare_mrc_volume(volume: np.ndarray, border_voxels: int = None) -> np.ndarray:
    """EG3D's convention: flip axis 0 and set a border of 30 x N/256 voxels to -1000."""
    volume = np.flip(volume, 0).astype(np.float32).copy()
    pad = int(30 * volume.shape[0] / 256) if border_voxels is None else border_voxels
    if pad > 0:
        volume[:pad] = volume[-pad:] = -1000
        volume[:, :pad] = volume[:, -pad:] = -1000
        volume[:, :, :pad] = volume[:, :, -pad:] = -1000
    return volume


def save_mrc(path: str, volume: np.ndarray, voxel_size: float = 1.0):
    """Atomically write a float32 .mrc volume (view it at the level that surface_level picks)."""
    import mrcfile
    with atomic_output(path, suffix='.mrc') as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
            mrc.voxel_size = voxel_size


def volume_to_mesh(volume: np.ndarray, level: float = EG3D_LEVEL, box_warp: float = 1.0):
    """Marching cubes at `level` -> (vertices (n, 3) world units in (x, y, z), faces (m, 3)).

    The surface encloses density above `level` (normals point outwards) and is closed: where
    the dense region meets the box, it is capped on the box faces.
    """
    check_dependencies('.ply')
    from skimage import measure
    if not (volume.min() < level < volume.max()):
        raise ValueError(f'the density volume never crosses level {level:.3g} (range {volume.min():.3g} .. {volume.max():.3g}): no surface')
    n = volume.shape[0]
    spacing = box_warp / (n - 1)
    # A layer far below the level around the grid closes every surface, within 1e-4 voxel of the box faces
    # for densities up to 100 above the level (exact clipping would leave zero-area faces).
    padded = np.pad(volume, 1, constant_values=min(float(volume.min()), level) - 1e6)
    # Density grows inwards; 'ascent' winds the faces counter-clockwise seen from outside (the default,
    # 'descent', turns the normals inwards).
    verts, faces, _, _ = measure.marching_cubes(padded, level=level, spacing=(spacing,) * 3, gradient_direction='ascent')
    verts = verts - spacing - box_warp / 2
    return verts.astype(np.float32), faces.astype(np.int32)


def save_ply(path: str, vertices: np.ndarray, faces: np.ndarray):
    """Atomically write a binary little-endian PLY with float vertices and triangle faces."""
    header = (f'ply\nformat binary_little_endian 1.0\nelement vertex {len(vertices)}\n'
              'property float x\nproperty float y\nproperty float z\n'
              f'element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n').encode()
    face_records = np.empty(len(faces), dtype=[('n', 'u1'), ('idx', '<i4', (3,))])
    face_records['n'] = 3
    face_records['idx'] = faces
    atomic_write_bytes(path, header + np.ascontiguousarray(vertices, dtype='<f4').tobytes() + face_records.tobytes())


def save_point_cloud(path: str, points: np.ndarray, rgb: Optional[np.ndarray] = None):
    """Atomically write a binary little-endian PLY of points (n, 3) float, optionally coloured by
    rgb (n, 3) in [0, 1] (stored as uchar red, green, blue), and no faces."""
    points = np.ascontiguousarray(points, dtype='<f4').reshape(-1, 3)
    fields = [('xyz', '<f4', (3,))] + ([('rgb', 'u1', (3,))] if rgb is not None else [])
    records = np.empty(len(points), dtype=fields)
    records['xyz'] = points
    colour_header = ''
    if rgb is not None:
        records['rgb'] = np.clip(np.round(np.asarray(rgb, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
        colour_header = 'property uchar red\nproperty uchar green\nproperty uchar blue\n'
    header = (f'ply\nformat binary_little_endian 1.0\nelement vertex {len(points)}\n'
              f'property float x\nproperty float y\nproperty float z\n{colour_header}end_header\n').encode()
    atomic_write_bytes(path, header + records.tobytes())


def save_mesh(path: str, vertices: np.ndarray, faces: np.ndarray):
    """Atomically write a triangle mesh as .ply (binary) or .obj (text), by the suffix of `path`."""
    if path.endswith('.ply'):
        save_ply(path, vertices, faces)
    elif path.endswith('.obj'):
        write_obj(path, vertices, faces)
    else:
        raise ValueError(f'{path}: meshes are saved as .ply or .obj')
