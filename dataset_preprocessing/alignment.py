"""Face alignment from five landmarks: POS fit, Deep3DFaceRecon's crop and EG3D's crop.

Image coordinates
-----------------
All 2D points are continuous pixel coordinates: x to the right, y down, the top-left
pixel covers [0, 1) x [0, 1), so its centre is (0.5, 0.5). (Detectors that report pixel
indices are converted by `landmarks.py`.) This is the convention of PIL's `resize(box=...)`
and, scaled to [-1, 1], of the project's NDC.

Alignment units
---------------
The five standard 3D landmarks live in the frame that Deep3DFaceRecon's camera and EG3D's
label conversion assume (`pose_label.py`): a camera at distance 10 with a 224-pixel image
whose face is scaled to 102 pixels per unit, and EG3D world = 0.27 * frame + (0, 0.006,
0.161). We place our head model in that frame with the inverse of EG3D's map, so that the
crop and the label camera agree on our mesh (`standard_landmarks_5`).

Five points, in this order (Deep3DFaceRecon / MTCNN): image-left eye centre (the subject's
right eye), image-right eye centre, nose tip, image-left mouth corner, image-right mouth
corner. From 68 iBUG points: mean of 36 and 39, mean of 42 and 45, 30, 48, 54.
"""

import dataclasses
from typing import Tuple

import numpy as np
from PIL import Image

from training import coords

# --- Constants of the two published crops ---------------------------------------------------
DEEP3D_RESCALE = 102.0       # Deep3DFaceRecon: pixels per alignment unit in its 224 crop
DEEP3D_SIZE = 224            # Deep3DFaceRecon's crop size
EG3D_RESCALE = 300.0         # EG3D: pixels per alignment unit in the 1024 alignment image
EG3D_ALIGN_SIZE = 1024       # EG3D's aligned image (only its centre is kept)
EG3D_CENTER_CROP = 700       # EG3D: centre crop of the aligned image, then resized
EG3D_OUTPUT_SIZE = 512

# --- EG3D's map from the Deep3DFaceRecon frame to EG3D world (used by the label too) -------
DEEP3D_CAMERA_DISTANCE = 10.0
DEEP3D_TO_WORLD_SCALE = 0.27
DEEP3D_TO_WORLD_OFFSET = (0.0, 0.006, 0.161)

FIVE_FROM_68 = ((36, 39), (42, 45), (30,), (48,), (54,))   # 68-point indices averaged per point

# `standard_landmarks_5` of our bundled head model's mean 68 landmarks (data/head_model,
# all coefficients zero), in alignment units: +x the subject's left, +y up, +z out of the
# face; mirror pairs averaged, so that a mirrored photo gets exactly the mirrored crop.
# Frozen here so that crops stay comparable when the model is refined (the tests check
# that it still agrees with the model to 0.01 units, about 1 mm). Deep3DFaceRecon's
# BFM-based points are similar in spread (eye to eye ~0.62) but sit ~0.18 units higher
# relative to the origin, on which the crop centres: our crops show the face lower than
# FFHQ's do. That is what our head model under `coords.mesh_to_world` needs for the label
# camera to see it where the image shows it.
STANDARD_LANDMARKS_5 = np.array([
    [-0.31734, 0.11664, -0.02827],      # image-left eye centre (the subject's right eye)
    [0.31734, 0.11664, -0.02827],       # image-right eye centre
    [0.0, -0.28479, 0.36254],           # nose tip
    [-0.25273, -0.59802, 0.10071],      # image-left mouth corner
    [0.25273, -0.59802, 0.10071],       # image-right mouth corner
])


def landmarks_68_to_5(lm68: np.ndarray) -> np.ndarray:
    """(..., 68, D) iBUG landmarks -> (..., 5, D) five alignment points (see module doc)."""
    lm68 = np.asarray(lm68)
    if lm68.shape[-2] != 68:
        raise ValueError(f'expected 68 landmarks, got shape {lm68.shape}')
    return np.stack([lm68[..., list(idx), :].mean(axis=-2) for idx in FIVE_FROM_68], axis=-2)


def five_from_68_matrix() -> np.ndarray:
    """(5, 68) float64 matrix W with W @ lm68 = landmarks_68_to_5(lm68)."""
    w = np.zeros([5, 68])
    for i, idx in enumerate(FIVE_FROM_68):
        w[i, list(idx)] = 1.0 / len(idx)
    return w


def world_to_alignment_units(points_world: np.ndarray) -> np.ndarray:
    """EG3D world (..., 3) -> the Deep3DFaceRecon frame, the inverse of EG3D's label map."""
    return (np.asarray(points_world, dtype=np.float64) - np.array(DEEP3D_TO_WORLD_OFFSET)) / DEEP3D_TO_WORLD_SCALE


def standard_landmarks_5(lm68_mesh: np.ndarray) -> np.ndarray:
    """Five standard 3D landmarks (5, 3) in alignment units from a head model's 68 mean
    landmarks (68, 3) in canonical mesh metres.

    mesh -> world (`coords.mesh_to_world`) -> Deep3DFaceRecon frame (inverse of EG3D's
    0.27 scale and offset), then scaled by kappa. Why kappa: EG3D re-normalises the camera
    radius from |0.27 * (0, 0, 10) + offset| = 2.861 to 2.7, so the label camera sits
    closer than the camera the crop was aligned for, and shows a face bigger by
    (2.861 - z) / (2.7 - z) at world depth z. Scaling the standard points by the same
    factor (z = mean world depth of the five points) makes the crop show the face at the
    size that the label camera projects it, so a mean-shape mesh needs scale 1 to fit.
    """
    lm68_mesh = np.asarray(lm68_mesh, dtype=np.float64)
    if lm68_mesh.shape != (68, 3):
        raise ValueError(f'expected (68, 3) landmarks, got {lm68_mesh.shape}')
    world = (lm68_mesh + np.array(coords.MESH_SHIFT)) * coords.MESH_TO_WORLD_SCALE
    five = landmarks_68_to_5(world)
    offset = np.array(DEEP3D_TO_WORLD_OFFSET)
    radius_before = np.linalg.norm(DEEP3D_TO_WORLD_SCALE * np.array([0, 0, DEEP3D_CAMERA_DISTANCE]) + offset)
    z = five[:, 2].mean()
    kappa = (radius_before - z) / (coords.CAMERA_RADIUS - z)
    return world_to_alignment_units(five) * kappa


def fit_scale_translation(points_2d: np.ndarray, points_3d: np.ndarray) -> Tuple[float, np.ndarray]:
    """Least-squares weak-perspective fit (POS): image ~ A @ [X, 1] with A a free 2x4 affine.

    points_2d: (N, 2) pixels (x right, y down); points_3d: (N, 3), N >= 4 not coplanar.
    Returns s = mean norm of A's two 3-vectors (pixels per 3D unit) and t = A[:, 3] (2,),
    the image of the 3D origin, in pixels. The sign of y does not matter to s.
    """
    p2 = np.asarray(points_2d, dtype=np.float64)
    p3 = np.asarray(points_3d, dtype=np.float64)
    if p2.ndim != 2 or p2.shape[1] != 2 or p3.shape != (len(p2), 3) or len(p2) < 4:
        raise ValueError(f'need (N, 2) and (N, 3) points with N >= 4, got {p2.shape} and {p3.shape}')
    if not (np.isfinite(p2).all() and np.isfinite(p3).all()):
        raise ValueError('landmarks contain non-finite values')
    x = np.concatenate([p3, np.ones([len(p3), 1])], axis=1)       # (N, 4)
    a, _, rank, _ = np.linalg.lstsq(x, p2, rcond=None)            # (4, 2): both rows at once
    if rank < 4:
        raise ValueError('degenerate landmarks: the 3D points are coplanar or repeated')
    s = 0.5 * (np.linalg.norm(a[:3, 0]) + np.linalg.norm(a[:3, 1]))
    return float(s), a[3].copy()


@dataclasses.dataclass
class CropBox:
    """A square region of the source image resampled to `size` x `size` pixels.

    center: (2,) source pixels; side: source pixels; size: output pixels.
    A source point p maps to (p - center) * size / side + size / 2.
    """
    center: np.ndarray
    side: float
    size: int

    @property
    def scale(self) -> float:
        """Output pixels per source pixel."""
        return self.size / self.side

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) source pixels -> crop pixels."""
        return (np.asarray(points, dtype=np.float64) - self.center) * self.scale + self.size / 2

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) crop pixels -> source pixels."""
        return (np.asarray(points, dtype=np.float64) - self.size / 2) / self.scale + self.center

    def bounds(self) -> Tuple[float, float, float, float]:
        """(left, top, right, bottom) in source pixels."""
        h = self.side / 2
        return (self.center[0] - h, self.center[1] - h, self.center[0] + h, self.center[1] + h)


def deep3d_crop_box(s: float, t: np.ndarray, rescale: float = DEEP3D_RESCALE, size: int = DEEP3D_SIZE) -> CropBox:
    """Deep3DFaceRecon's crop: rescale the image by rescale / s, cut `size` around t.

    In source pixels this is the square of side size * s / rescale centred on t. (The
    original also truncates the resized image size and the box corner to integers, which
    moves the box by up to one pixel; we keep the exact box.)
    """
    return CropBox(center=np.asarray(t, dtype=np.float64).copy(), side=size * s / rescale, size=size)


def eg3d_crop_box(s: float, t: np.ndarray, size: int = EG3D_OUTPUT_SIZE) -> CropBox:
    """EG3D's crop: align to 1024 with rescale 300, centre-crop 700, resize to `size`.

    Aligning with rescale 300 makes one alignment unit 300 pixels and puts t at the centre
    of the 1024 image; its central 700 pixels are therefore the square of side
    700 / 300 units = 700 * s / 300 source pixels centred on t, which is then resized to
    `size` (512 in EG3D) with a Lanczos filter. We resample that square once, directly.
    """
    return CropBox(center=np.asarray(t, dtype=np.float64).copy(), side=EG3D_CENTER_CROP * s / EG3D_RESCALE, size=size)


def crop_image(image: Image.Image, box: CropBox, resample=Image.LANCZOS) -> Image.Image:
    """Resample `box` of `image` to box.size x box.size; outside the image is black.

    The image is padded with black first so that boxes reaching past the border keep their
    geometry (PIL's resize box must lie inside the image).
    """
    left, top, right, bottom = box.bounds()
    w, h = image.size
    pad_l = int(np.ceil(max(0.0, -left)))
    pad_t = int(np.ceil(max(0.0, -top)))
    pad_r = int(np.ceil(max(0.0, right - w)))
    pad_b = int(np.ceil(max(0.0, bottom - h)))
    if pad_l or pad_t or pad_r or pad_b:
        padded = Image.new(image.mode, (w + pad_l + pad_r, h + pad_t + pad_b))
        padded.paste(image, (pad_l, pad_t))
        image = padded
    region = (left + pad_l, top + pad_t, right + pad_l, bottom + pad_t)
    return image.resize((box.size, box.size), resample=resample, box=region)


def align_face(points_5: np.ndarray, standard_5: np.ndarray = None, size: int = EG3D_OUTPUT_SIZE) -> Tuple[CropBox, float, np.ndarray]:
    """Five image landmarks (5, 2) -> (EG3D crop box, POS scale s, POS translation t)."""
    standard_5 = STANDARD_LANDMARKS_5 if standard_5 is None else standard_5
    if standard_5 is None:
        raise ValueError('no standard 3D landmarks given')
    points_5 = np.asarray(points_5, dtype=np.float64)
    if points_5.shape != (5, 2):
        raise ValueError(f'expected (5, 2) landmarks, got {points_5.shape}')
    s, t = fit_scale_translation(points_5, np.asarray(standard_5))
    if not s > 0:
        raise ValueError('degenerate landmarks: zero scale')
    return eg3d_crop_box(s, t, size=size), s, t
