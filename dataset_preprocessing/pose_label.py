"""Head pose (Deep3DFaceRecon's angles and translation) -> EG3D's 25-float camera label.

Deep3DFaceRecon's convention: a head point X (its canonical frame: x the subject's left,
y up, z out of the face) is moved to R X + t with R = Rz(c) Ry(b) Rx(a) for angles
(a, b, c) in radians, and seen by a camera at (0, 0, 10) looking down -z (x right, y up).
The camera, expressed in the head's frame, therefore has rotation R^T (its axes as
columns) and centre R^T ((0, 0, 10) - t) = -R^T (t - (0, 0, 10)).

EG3D's conversion to a label (SPEC section 12), step by step:
  1. cam2world rotation R^T, centre c = -R^T (t - (0, 0, 10)).
  2. c <- 0.27 c + (0, 0.006, 0.161): the head frame into EG3D's world.
  3. rotation <- rotation @ diag(1, -1, -1): OpenGL-style camera axes (y up, looking down
     -z) to OpenCV's (y down, z forward).
  4. c <- 2.7 c / |c|: the radius about the world origin becomes 2.7 (EG3D's 'orig'
     normalisation; the rotation is kept, so the camera need not look at the origin).
  5. intrinsics: focal 4.2647, principal point (0.5, 0.5), normalised by the image size.

Mirroring the image left-right is mirroring the world about x = 0: with F = diag(-1, 1, 1),
cam2world -> diag(F, 1) @ cam2world @ diag(F, 1) (EG3D's flip_yaw), which is the same as
angles (a, b, c) -> (a, -b, -c) and t -> (-t_x, t_y, t_z).
"""

import os

import numpy as np
import scipy.io
import torch

from training import coords

from dataset_preprocessing.alignment import (DEEP3D_CAMERA_DISTANCE, DEEP3D_TO_WORLD_OFFSET,
                                             DEEP3D_TO_WORLD_SCALE)

DEEP3D_COEFF_LAYOUT = (('id', 80), ('exp', 64), ('tex', 80), ('angle', 3), ('gamma', 27), ('trans', 3))   # 257 values


def deep3d_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Angles (..., 3) in radians -> R = Rz Ry Rx (..., 3, 3), applied to column vectors."""
    return coords.euler_to_matrix(torch.rad2deg(torch.as_tensor(angles)))


def matrix_to_deep3d_angles(rot: np.ndarray) -> np.ndarray:
    """Inverse of `deep3d_rotation` for (3, 3) R = Rz Ry Rx; the y angle is in [-pi/2, pi/2]."""
    rot = np.asarray(rot, dtype=np.float64)
    b = np.arcsin(np.clip(-rot[2, 0], -1, 1))
    a = np.arctan2(rot[2, 1], rot[2, 2])
    c = np.arctan2(rot[1, 0], rot[0, 0])
    return np.array([a, b, c])


def pose_to_cam2world(angles: torch.Tensor, trans: torch.Tensor, radius: float = coords.CAMERA_RADIUS) -> torch.Tensor:
    """Deep3DFaceRecon pose -> OpenCV cam2world (B, 4, 4) in EG3D's world (module doc).

    angles: (B, 3) radians; trans: (B, 3) Deep3DFaceRecon units (decimetres of its BFM).
    Differentiable; float32.
    """
    angles = torch.as_tensor(angles, dtype=torch.float32)
    trans = torch.as_tensor(trans, dtype=torch.float32)
    if angles.ndim != 2 or angles.shape[1] != 3 or trans.shape != angles.shape:
        raise ValueError(f'angles and trans must be (B, 3), got {tuple(angles.shape)} and {tuple(trans.shape)}')
    rot_t = deep3d_rotation(angles).transpose(1, 2)                         # head -> camera axes
    cam_pos = torch.tensor([0.0, 0.0, DEEP3D_CAMERA_DISTANCE])
    centre = -(rot_t @ (trans - cam_pos)[:, :, None])[:, :, 0]
    centre = DEEP3D_TO_WORLD_SCALE * centre + torch.tensor(DEEP3D_TO_WORLD_OFFSET)
    centre = centre * (radius / centre.norm(dim=1, keepdim=True))
    rot_cv = rot_t * torch.tensor([1.0, -1.0, -1.0])                        # @ diag(1, -1, -1)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(len(angles), 1, 4)
    return torch.cat([torch.cat([rot_cv, centre[:, :, None]], dim=2), bottom], dim=1)


def pose_to_label(angles: torch.Tensor, trans: torch.Tensor, focal: float = coords.FOCAL_LENGTH) -> torch.Tensor:
    """Deep3DFaceRecon pose (B, 3), (B, 3) -> 25-float labels (B, 25); differentiable."""
    return coords.make_label(pose_to_cam2world(angles, trans), coords.intrinsics(focal))


def mirror_cam2world(cam2world: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) -> the camera of the left-right mirrored image (EG3D's flip_yaw)."""
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=cam2world.dtype))
    return flip @ cam2world @ flip


def mirror_label(c: torch.Tensor) -> torch.Tensor:
    """(B, 25) labels -> labels of the mirrored images (principal point x -> 1 - x)."""
    cam2world, intr = coords.split_label(c)
    intr = intr.clone()
    intr[:, 0, 2] = 1 - intr[:, 0, 2]
    return coords.make_label(mirror_cam2world(cam2world), intr)


def mirror_pose(angles: torch.Tensor, trans: torch.Tensor):
    """Deep3DFaceRecon pose of the mirrored image: (a, -b, -c), (-t_x, t_y, t_z)."""
    sign = torch.tensor([1.0, -1.0, -1.0])
    return torch.as_tensor(angles) * sign, torch.as_tensor(trans) * -sign


def cam2world_to_head_angles(cam2world: np.ndarray) -> np.ndarray:
    """OpenCV cam2world (4, 4) -> Deep3DFaceRecon angles (3,) radians of its rotation.

    Inverts steps 1 and 3 of the conversion (the rotation only), so that yaw (y), pitch (x)
    and roll (z) of any label, ours or a ground truth, can be compared.
    """
    rot_cv = np.asarray(cam2world, dtype=np.float64)[:3, :3]
    return matrix_to_deep3d_angles((rot_cv * np.array([1.0, -1.0, -1.0])).T)


def load_deep3d_mat(path: str):
    """Angles (3,) radians and translation (3,) from a Deep3DFaceRecon result `.mat`.

    Accepts the per-image dict that its test script saves (keys 'angle' and 'trans', each
    1 x 3) or a 257-value 'coeffs'/'coeff' vector (id 80, exp 64, tex 80, angle 3,
    gamma 27, trans 3).
    """
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:
        raise ValueError(f'{path}: not a readable .mat file ({e})') from None
    if 'angle' in mat and 'trans' in mat:
        angle, trans = np.asarray(mat['angle'], np.float64).reshape(-1), np.asarray(mat['trans'], np.float64).reshape(-1)
    else:
        key = next((k for k in ('coeffs', 'coeff') if k in mat), None)
        if key is None:
            raise ValueError(f'{path}: expected keys "angle" and "trans" or a 257-value "coeffs"')
        coeff = np.asarray(mat[key], np.float64).reshape(-1)
        if coeff.size != 257:
            raise ValueError(f'{path}: "{key}" has {coeff.size} values, expected 257')
        start = sum(n for name, n in DEEP3D_COEFF_LAYOUT[:3])
        angle, trans = coeff[start:start + 3], coeff[-3:]
    if angle.size != 3 or trans.size != 3 or not (np.isfinite(angle).all() and np.isfinite(trans).all()):
        raise ValueError(f'{path}: "angle" and "trans" must be 3 finite values each')
    return angle, trans


def find_deep3d_mat(folder: str, stem: str):
    """Path of `<folder>/<stem>.mat`, or None."""
    path = os.path.join(folder, stem + '.mat')
    return path if os.path.isfile(path) else None
