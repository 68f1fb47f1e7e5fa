"""2D face landmarks: the offline dlib detector, landmark text files, mirroring.

Points are returned in continuous pixel coordinates (the top-left pixel's centre is
(0.5, 0.5), see `alignment.py`). dlib and Deep3DFaceRecon's `detections/*.txt` files give
pixel indices (the top-left pixel's centre is (0, 0)): 0.5 is added on reading.

The detector is dlib's HOG face detector with its 68-point shape predictor, whose model
files ship in the `face-recognition-models` package. That package's module is never
imported (it imports `pkg_resources`, gone from recent setuptools); its folder is found
with `importlib.util.find_spec`, which does not run it.
"""

import importlib.util
import os
from typing import Optional

import numpy as np

from training.coords import LANDMARK_MIRROR

INSTALL_HINT = 'pip install dlib-bin face-recognition-models'

IBUG_MIRROR = np.array(LANDMARK_MIRROR)     # see training.coords


class NoFaceError(ValueError):
    """No face was found in an image."""


def read_landmarks_txt(path: str) -> np.ndarray:
    """A text file of 5 or 68 lines "x y" (pixel indices) -> (N, 2) float64 continuous pixels."""
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: not a landmark file of lines "x y" ({e})') from None
    if values.ndim != 2 or values.shape[1] != 2 or len(values) not in (5, 68):
        raise ValueError(f'{path}: expected 5 or 68 lines of "x y", got an array of shape {values.shape}')
    if not np.isfinite(values).all():
        raise ValueError(f'{path}: non-finite landmark')
    return values + 0.5


def mirror_landmarks_2d(points: np.ndarray, width: float) -> np.ndarray:
    """(N, 2) continuous pixels of an image `width` wide -> the left-right mirrored image's.

    68 points are re-ordered with IBUG_MIRROR; 5 points swap eyes and mouth corners.
    """
    points = np.asarray(points, dtype=np.float64)
    order = {68: IBUG_MIRROR, 5: np.array([1, 0, 2, 4, 3])}.get(len(points))
    if order is None:
        raise ValueError(f'can mirror 5 or 68 landmarks, got {len(points)}')
    out = points[order].copy()
    out[:, 0] = width - out[:, 0]
    return out


def face_models_dir() -> Optional[str]:
    """The folder of face-recognition-models' model files, or None when it is not installed."""
    spec = importlib.util.find_spec('face_recognition_models')
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], 'models')


class DlibLandmarkDetector:
    """dlib's HOG detector + 68-point predictor; keeps the largest face of an image."""

    def __init__(self,
                 predictor_path: str = None,        # shape_predictor_68_face_landmarks.dat; None: from face-recognition-models
                 upsample: int = 1,                 # detector upsampling passes (finds faces down to ~40 px)
                 max_detect_size: int = 1024,       # larger images are searched at this size (the 68 points use full resolution)
                 ):
        try:
            import dlib
        except ImportError:
            raise RuntimeError(f'the landmark detector needs dlib: {INSTALL_HINT}') from None
        if predictor_path is None:
            folder = face_models_dir()
            if folder is None:
                raise RuntimeError(f'the 68-point model file comes with face-recognition-models: {INSTALL_HINT}')
            predictor_path = os.path.join(folder, 'shape_predictor_68_face_landmarks.dat')
        if not os.path.isfile(predictor_path):
            raise RuntimeError(f'{predictor_path}: 68-point model file not found ({INSTALL_HINT})')
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(predictor_path)
        self._upsample = int(upsample)
        self._max_size = int(max_detect_size)
        self._dlib = dlib

    def detect(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (68, 2) float64 continuous pixels of the largest face.

        Raises NoFaceError when there is none. Ties in size go to the higher detector score.
        """
        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}')
        h, w = image.shape[:2]
        factor = min(1.0, self._max_size / max(h, w))
        small = image
        if factor < 1:
            from PIL import Image
            small = np.asarray(Image.fromarray(image).resize((round(w * factor), round(h * factor)), Image.BILINEAR))
        rects, scores, _ = self._detector.run(small, self._upsample, 0.0)
        if len(rects) == 0:
            raise NoFaceError('no face found')
        best = max(range(len(rects)), key=lambda i: (rects[i].width() * rects[i].height(), scores[i]))
        r = rects[best]
        rect = self._dlib.rectangle(*(int(round(v / factor)) for v in (r.left(), r.top(), r.right(), r.bottom())))
        shape = self._predictor(image, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64) + 0.5


def detector_available() -> bool:
    """Whether dlib and the 68-point model file are installed."""
    if importlib.util.find_spec('dlib') is None:
        return False
    folder = face_models_dir()
    return folder is not None and os.path.isfile(os.path.join(folder, 'shape_predictor_68_face_landmarks.dat'))
