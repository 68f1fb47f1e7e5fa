"""Shared machinery of the ops: kernel-or-reference dispatch and the just-in-time CUDA build.

Dispatch rules, the same for every op:
- `impl='ref'`, or the environment variable NEXT3D_OPS_REF=1: the plain-PyTorch reference;
- `impl=None`: the CUDA kernel when all tensors are on a CUDA device and the extension
  builds, else the reference;
- `impl='cuda'`: like None, but tensors off the GPU are an error (a build failure still
  falls back, with the warning).

The extensions are compiled on first use with `torch.utils.cpp_extension.load` (ninja)
into the user cache folder (`dnnlib.make_cache_dir_path('torch_extensions', ...)`), in a
folder keyed by a hash of the sources, the PyTorch and CUDA versions and the GPU
architecture, so a changed source or a different GPU never picks up a stale build. A
failed build writes its log there (or to the temp folder), warns once naming it, and the
op uses its reference from then on; it never raises.
"""

import hashlib
import os
import tempfile
import traceback
import warnings
from types import ModuleType
from typing import Optional, Sequence

import torch

import dnnlib

IMPLS = (None, 'ref', 'cuda')
SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))

# Loaded extensions by name; None records a failed build (warned about once).
_extensions: dict = {}


@torch.compiler.assume_constant_result
def force_ref() -> bool:
    """True when NEXT3D_OPS_REF asks for the references everywhere (read at trace time under torch.compile)."""
    return os.environ.get('NEXT3D_OPS_REF', '0').strip().lower() not in ('', '0', 'false', 'no')


def want_kernel(op: str, impl: Optional[str], *tensors: Optional[torch.Tensor]) -> bool:
    """Whether `op` should try its CUDA kernel for these tensors (None entries are skipped)."""
    if impl not in IMPLS:
        raise ValueError(f'{op}: impl must be None, "ref" or "cuda", got {impl!r}')
    if impl == 'ref' or force_ref():
        return False
    on_gpu = all(t.device.type == 'cuda' for t in tensors if t is not None)
    if impl == 'cuda' and not on_gpu:
        devices = sorted({str(t.device) for t in tensors if t is not None})
        raise ValueError(f'{op}: impl="cuda" needs CUDA tensors, got tensors on {", ".join(devices)}')
    return on_gpu


def _source_paths(sources: Sequence[str]) -> list:
    return [os.path.join(SOURCE_DIR, s) for s in sources]


def build_key(name: str, sources: Sequence[str]) -> str:
    """Hash of everything that makes a build reusable: sources, PyTorch, CUDA, GPU arch."""
    h = hashlib.sha256()
    h.update(name.encode())
    for path in _source_paths(sources):
        h.update(os.path.basename(path).encode())
        with open(path, 'rb') as f:
            h.update(f.read())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    if torch.cuda.is_available():
        h.update(str(torch.cuda.get_device_capability()).encode())
    h.update(os.environ.get('TORCH_CUDA_ARCH_LIST', '').encode())
    return h.hexdigest()[:16]


def _load(name: str, sources: Sequence[str], build_dir: str) -> ModuleType:
    """Compile and import one extension (raises on any failure)."""
    if torch.version.cuda is None:
        raise RuntimeError(f'this PyTorch ({torch.__version__}) was built without CUDA')
    if not torch.cuda.is_available():
        raise RuntimeError('no CUDA device is available')
    from torch.utils import cpp_extension
    cpp_extension.verify_ninja_availability()
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load(
        name=f'next3d_{name}_{os.path.basename(build_dir).rsplit("-", 1)[-1][:8]}',
        sources=_source_paths(sources),
        build_directory=build_dir,
        extra_cflags=['-O3'],
        extra_cuda_cflags=['-O3', '--expt-relaxed-constexpr'],
        verbose=False,
    )


def _write_log(build_dir: str, text: str) -> str:
    """Write the build log beside the build, or in the temp folder if that is not writable."""
    for folder in (build_dir, tempfile.gettempdir()):
        path = os.path.join(folder, 'build_error.log' if folder == build_dir else f'next3d_{os.path.basename(build_dir)}_build_error.log')
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = path + '.tmp'
            with open(tmp, 'w') as f:
                f.write(text)
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    return '<unwritable>'


def get_extension(name: str, sources: Sequence[str]) -> Optional[ModuleType]:
    """The compiled extension `name` built from `sources` (file names in this folder), or
    None if it cannot be built; the first failure warns once, naming the build log."""
    if name in _extensions:
        return _extensions[name]
    build_dir = dnnlib.make_cache_dir_path('torch_extensions', f'{name}-{build_key(name, sources)}')
    try:
        module = _load(name, sources, build_dir)
    except Exception as e:     # A failed build must never take training down: fall back.
        log = _write_log(build_dir, f'Building the {name} CUDA extension failed.\n\n{traceback.format_exc()}')
        warnings.warn(f'torch_utils.ops: could not build the {name} CUDA extension ({type(e).__name__}: '
                      f'{str(e).strip().splitlines()[0] if str(e).strip() else "no message"}); using the slower '
                      f'PyTorch reference instead. Build log: {log}', RuntimeWarning, stacklevel=3)
        module = None
    _extensions[name] = module
    return module


@torch.compiler.assume_constant_result
def kernel_available(name: str, sources: tuple) -> bool:
    """True if the extension builds (builds it on first call; constant under torch.compile)."""
    return get_extension(name, sources) is not None
