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
op uses its reference from then on; it never raises. A build lock left behind by a
process killed mid-build is waited on for at most NEXT3D_OPS_BUILD_TIMEOUT seconds
(default 600), then the op falls back in the same way.

A kernel that builds can still be wrong or unable to run on this GPU (e.g. compiled for
another architecture: "no kernel image is available"). So on first use on each device,
every op runs its self-check (`register_self_check`): kernel against reference on a
small input, forward and gradient. A kernel that fails it is not used on that device;
one warning says why.
"""

import hashlib
import os
import tempfile
import time
import traceback
import warnings
from types import ModuleType
from typing import Optional, Sequence

import torch

import dnnlib
from torch_utils import misc

IMPLS = (None, 'ref', 'cuda')
SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))

# Loaded extensions by name; None records a failed build (warned about once).
_extensions: dict = {}
# Self-checks by op name, and their verdicts per (op name, device).
_self_checks: dict = {}
_self_check_passed: dict = {}
LOCK_NAME = 'lock'      # torch.utils.cpp_extension's build lock in the build folder


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
    wait_for_build_lock(build_dir)
    return cpp_extension.load(
        name=f'next3d_{name}_{os.path.basename(build_dir).rsplit("-", 1)[-1][:8]}',
        sources=_source_paths(sources),
        build_directory=build_dir,
        extra_cflags=['-O3'],
        extra_cuda_cflags=['-O3', '--expt-relaxed-constexpr'],
        verbose=False,
    )


def build_timeout() -> float:
    return float(os.environ.get('NEXT3D_OPS_BUILD_TIMEOUT', '600'))


def wait_for_build_lock(build_dir: str, timeout: float = None, poll: float = 1.0):
    """Wait while another process holds the build lock; TimeoutError once the lock is older than `timeout` s.

    torch's builder waits on its lock forever, so a rank killed mid-build would hang every
    later run; a lock this old is taken to be such a leftover.
    """
    timeout = build_timeout() if timeout is None else timeout
    lock = os.path.join(build_dir, LOCK_NAME)
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:
            return      # no lock (or it just went away)
        if age > timeout:
            raise TimeoutError(f'{lock}: a build lock {age:.0f} s old (a build killed midway leaves it behind; '
                               f'delete it to rebuild, or raise NEXT3D_OPS_BUILD_TIMEOUT)')
        time.sleep(poll)


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


def eager_function(name: str, impl, setup_context, backward) -> type:
    """A torch.library op's parts as a plain autograd Function `name`: forward runs
    setup_context(ctx, inputs, None) and impl(*inputs); backward(ctx, *grads) as given.

    Eager mode calls this instead of the op: a library op costs ~50 us more per call in
    Python (measured on the CPU twins), which on a GPU is host time per call, and a training
    step makes about a thousand such calls. torch.compile traces the op itself.
    """
    def forward(ctx, *inputs):
        setup_context(ctx, inputs, None)
        return impl(*inputs)
    return type(name, (torch.autograd.Function,), dict(forward=staticmethod(forward), backward=staticmethod(backward),
                                                       __module__=impl.__module__, __qualname__=name))


def register_self_check(name: str, check):
    """`check(ext, device)` compares op `name`'s kernel with its reference and raises on a mismatch."""
    _self_checks[name] = check


def passes_self_check(name: str, ext: ModuleType, device: torch.device) -> bool:
    """Whether `ext` passed op `name`'s self-check on `device` (run once per device; a failure warns once)."""
    key = (name, str(device))
    if key not in _self_check_passed:
        check = _self_checks.get(name)
        try:
            if check is not None:
                # Outside inference_mode (a first use may be inside it), so that the checks'
                # reference gradients can be taken; no graph kept otherwise.
                with torch.inference_mode(False), torch.no_grad():
                    check(ext, torch.device(device))
                if torch.device(device).type == 'cuda':
                    torch.cuda.synchronize(device)
            _self_check_passed[key] = True
        except Exception as e:      # a wrong or unlaunchable kernel must never reach training
            message = str(e).strip().splitlines()[0] if str(e).strip() else 'no message'
            warnings.warn(f'torch_utils.ops: the {name} CUDA kernel failed its self-check on {device} '
                          f'({type(e).__name__}: {message}); using the slower PyTorch reference there instead.',
                          RuntimeWarning, stacklevel=3)
            _self_check_passed[key] = False
    return _self_check_passed[key]


def assert_close(name: str, what: str, got: torch.Tensor, ref: torch.Tensor, tol: float):
    """Raise AssertionError naming `what` when |got - ref| exceeds tol x (1 + |ref|) anywhere."""
    if got.shape != ref.shape:
        raise AssertionError(f'{name} {what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}')
    err = misc.relative_error(got, ref)
    if not err <= tol:      # also catches NaN
        raise AssertionError(f'{name} {what}: relative error {err:.3g} > {tol:g}')


@torch.compiler.assume_constant_result
def kernel_available(name: str, sources: tuple, device: torch.device = None) -> bool:
    """True if the extension builds and (given a device) passes its self-check there; constant under torch.compile."""
    ext = get_extension(name, sources)
    if ext is None:
        return False
    return device is None or passes_self_check(name, ext, device)
