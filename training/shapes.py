"""Density volumes from a generator, saved as .mrc volumes or .ply surfaces."""

import numpy as np
import torch

from torch_utils.persistence import atomic_output, atomic_write_bytes


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
    """Atomically write a float32 .mrc volume (open in ChimeraX at level ~10)."""
    import mrcfile
    with atomic_output(path, suffix='.mrc') as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
            mrc.voxel_size = voxel_size


def volume_to_mesh(volume: np.ndarray, level: float = 10.0, box_warp: float = 1.0):
    """Marching cubes at `level` -> (vertices (n, 3) world units in (x, y, z), faces (m, 3))."""
    try:
        from skimage import measure
    except ImportError as e:
        raise RuntimeError("--shape-format .ply needs scikit-image: pip install -e '.[shapes]'") from e
    if not (volume.min() < level < volume.max()):
        raise ValueError(f'the density volume never crosses level {level} (range {volume.min():.3g} .. {volume.max():.3g}): no surface')
    n = volume.shape[0]
    spacing = box_warp / (n - 1)
    verts, faces, _, _ = measure.marching_cubes(volume, level=level, spacing=(spacing,) * 3)
    verts = verts - box_warp / 2
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
