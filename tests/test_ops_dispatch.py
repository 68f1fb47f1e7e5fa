"""Kernel-or-reference dispatch, the build fallback, and the torch.library op layer on CPU.

The ops' CUDA implementations cannot run without a GPU, but everything around them can:
on CPU tensors each torch.library op runs a PyTorch twin of its kernel, so with the
dispatch pretending the kernels are available (`pretend_kernels`, conftest.py) these tests exercise
the ops' autograd formulas, fake kernels and torch.compile tracing exactly as on a GPU.
"""

import math
import os
import warnings

import numpy as np
import pytest
import torch

from torch_utils import misc
from torch_utils.ops import _build
from torch_utils.ops import bias_act as B
from torch_utils.ops import conv2d_resample as CR
from torch_utils.ops import filtered_lrelu as FL
from torch_utils.ops import upfirdn2d as U

OPS_DIR = os.path.dirname(_build.__file__)


def _run_all_ops(impl=None):
    """One call of each public op on small CPU tensors (float64)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=g)
    b = torch.randn(3, dtype=torch.float64, generator=g)
    f = U.setup_filter([1, 3, 3, 1])
    return [
        B.bias_act(x, b, act='lrelu', clamp=1.0, impl=impl),
        U.upfirdn2d(x, f, up=2, down=1, padding=[2, 1, 1, 2], impl=impl),
        U.upsample2d(x, f, impl=impl),
        U.downsample2d(x, U.setup_filter(list(range(1, 9))), impl=impl),
        FL.filtered_lrelu(x, f, f, b, up=2, down=2, padding=3, clamp=0.5, impl=impl),
    ]


@pytest.fixture
def fresh_build_state(monkeypatch, tmp_path):
    """No extension loaded or failed yet; the build cache in tmp_path."""
    monkeypatch.setattr(_build, '_extensions', {})
    monkeypatch.setenv('NEXT3D_CACHE_DIR', str(tmp_path))
    monkeypatch.delenv('NEXT3D_OPS_REF', raising=False)
    return tmp_path


def test_cuda_sources_present():
    for name, kernels in [('bias_act', ['bias_act_kernel']), ('upfirdn2d', ['upfirdn2d_kernel'])]:
        cu = open(os.path.join(OPS_DIR, f'{name}.cu')).read()
        cpp = open(os.path.join(OPS_DIR, f'{name}.cpp')).read()
        for kernel in kernels:
            assert f'__global__ void {kernel}' in cu
        assert 'AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16' in cu
        assert 'PYBIND11_MODULE(TORCH_EXTENSION_NAME' in cpp
    assert B.SOURCES == ('bias_act.cpp', 'bias_act.cu') and U.SOURCES == ('upfirdn2d.cpp', 'upfirdn2d.cu')


def test_cpu_tensors_use_reference_without_building(monkeypatch, fresh_build_state):
    def no_build(*args):
        raise AssertionError('CPU tensors must not trigger a CUDA build')
    monkeypatch.setattr(_build, '_load', no_build)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for got, ref in zip(_run_all_ops(None), _run_all_ops('ref')):
            assert torch.equal(got, ref)
    assert _build._extensions == {}


def test_impl_argument_checked():
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match='impl="cuda" needs CUDA tensors'):
        B.bias_act(x, impl='cuda')
    with pytest.raises(ValueError, match='impl="cuda" needs CUDA tensors'):
        U.upfirdn2d(x, None, impl='cuda')
    with pytest.raises(ValueError, match='impl must be'):
        B.bias_act(x, impl='triton')
    with pytest.raises(ValueError, match='impl must be'):
        FL.filtered_lrelu(x, impl='fast')


def test_env_var_forces_reference(monkeypatch):
    monkeypatch.setenv('NEXT3D_OPS_REF', '1')
    monkeypatch.setattr(_build, 'kernel_available', lambda *args: pytest.fail('must not look for kernels'))
    x = torch.randn(1, 2, 4, 4)
    # impl='cuda' on CPU tensors would raise; the variable overrides it.
    assert torch.equal(B.bias_act(x, act='relu', impl='cuda'), B.bias_act(x, act='relu', impl='ref'))
    assert torch.equal(U.upsample2d(x, U.setup_filter([1, 1]), impl='cuda'), U.upsample2d(x, U.setup_filter([1, 1]), impl='ref'))
    monkeypatch.setenv('NEXT3D_OPS_REF', '0')
    assert not _build.force_ref()


def test_failed_build_warns_once_and_falls_back(monkeypatch, fresh_build_state):
    calls = []

    def failing_load(name, sources, build_dir):
        calls.append(name)
        raise RuntimeError('nvcc: simulated compiler failure')
    monkeypatch.setattr(_build, '_load', failing_load)
    # Pretend the tensors are on a GPU so the ops try to build their extensions.
    monkeypatch.setattr(_build, 'want_kernel', lambda op, impl, *tensors: impl != 'ref')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        first = _run_all_ops(None)
        second = _run_all_ops(None)
    messages = [str(w.message) for w in caught]
    assert sorted(calls) == ['bias_act', 'upfirdn2d']       # one build attempt per extension
    assert len(messages) == 2 and all('Build log:' in m for m in messages)
    for m in messages:
        log = m.split('Build log: ')[1].strip()
        assert log.startswith(str(fresh_build_state))
        assert 'simulated compiler failure' in open(log).read()
    for got, again, ref in zip(first, second, _run_all_ops('ref')):
        assert torch.equal(got, ref) and torch.equal(again, ref)


@pytest.mark.skipif(torch.version.cuda is not None and torch.cuda.is_available(), reason='this machine can build the extension')
def test_real_loader_without_cuda_warns(fresh_build_state):
    with pytest.warns(RuntimeWarning, match='could not build the bias_act CUDA extension'):
        assert _build.get_extension('bias_act', B.SOURCES) is None
    assert _build.get_extension('bias_act', B.SOURCES) is None      # cached failure, no second warning


def test_build_key_tracks_sources_and_versions(monkeypatch, tmp_path):
    for name in U.SOURCES:
        (tmp_path / name).write_bytes(open(os.path.join(OPS_DIR, name), 'rb').read())
    monkeypatch.setattr(_build, 'SOURCE_DIR', str(tmp_path))
    key = _build.build_key('upfirdn2d', U.SOURCES)
    assert key == _build.build_key('upfirdn2d', U.SOURCES) and len(key) == 16
    (tmp_path / 'upfirdn2d.cu').write_text(open(tmp_path / 'upfirdn2d.cu').read() + '\n// changed\n')
    assert _build.build_key('upfirdn2d', U.SOURCES) != key
    changed = _build.build_key('upfirdn2d', U.SOURCES)
    monkeypatch.setattr(torch, '__version__', torch.__version__ + '.other')
    assert _build.build_key('upfirdn2d', U.SOURCES) != changed


# ---------------------------------------------------------------------------------------
# The torch.library layer, through the CPU twins of the kernels.

def test_ops_match_reference(pretend_kernels):
    for got, ref in zip(_run_all_ops(None), _run_all_ops('ref')):
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('act', sorted(B.ACTIVATIONS))
def test_bias_act_op_gradients(pretend_kernels, act):
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x = (x.sign() * (x.abs() + 0.05)).requires_grad_(True)
    b = (0.01 * torch.randn(3, dtype=torch.float64)).requires_grad_(True)
    for clamp in (None, 0.7):
        fn = lambda x, b: B.bias_act(x, b, act=act, alpha=0.25, gain=1.3, clamp=clamp)
        ref = lambda x, b: B.bias_act(x, b, act=act, alpha=0.25, gain=1.3, clamp=clamp, impl='ref')
        assert torch.allclose(fn(x, b), ref(x, b), rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))


@pytest.mark.parametrize('up, down, padding, flip_filter, taps', [
    (2, 1, [2, 1, 2, 1], False, [1, 3, 3, 1]),
    (4, 2, [1, -2, 3, 0], True, [[1, 0.5], [-2, 3], [0.25, 1]]),
    (1, 4, [-1, 2, 2, 1], False, [1, 2, 3]),
    ((1, 2), (2, 1), [1, 2, -1, 1], True, [1, 2, 3, 4, 5, 6, 7, 8]),
])
def test_upfirdn2d_op_gradients(pretend_kernels, up, down, padding, flip_filter, taps):
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    f = U.setup_filter(taps, normalize=False)
    fn = lambda x: U.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=1.5)
    assert torch.allclose(fn(x), U.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=1.5, impl='ref'))
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_library_ops_gradients_directly():
    # What torch.compile traces: the library ops' own autograd (eager mode runs the same
    # formulas as autograd Functions, which the tests above go through), to second order.
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x = (x.sign() * (x.abs() + 0.05)).requires_grad_(True)
    b = (0.01 * torch.randn(3, dtype=torch.float64)).requires_grad_(True)
    for act, clamp in (('lrelu', 0.7), ('swish', -1.0), ('softplus', -1.0)):
        fn = lambda x, b: B._bias_act_op(x, b, 1, act, 0.25, 1.3, clamp)
        assert torch.autograd.gradcheck(fn, (x, b)) and torch.autograd.gradgradcheck(fn, (x, b))
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    f = U.setup_filter([[1, 0.5], [-2, 3], [0.25, 1]], normalize=False)
    fn = lambda x: U._upfirdn2d_op(x, f, 2, 2, 1, 2, 1, -1, 2, 0, True, 1.5)
    assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))


def test_filtered_lrelu_and_conv_gradients(pretend_kernels):
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    x = (x.sign() * (x.abs() + 0.05)).requires_grad_(True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    f = U.setup_filter([1, 3, 3, 1])
    fn = lambda x, b: FL.filtered_lrelu(x, f, f, b, up=2, down=2, padding=[3, 2, 3, 2], clamp=0.8, slope=0.3)
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w: CR.conv2d_resample(x, w, f, up=2, padding=1)
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_opcheck_and_memory_format(pretend_kernels):
    x = torch.randn(2, 3, 5, 6).to(memory_format=torch.channels_last)
    f = torch.randn(3, 4)
    torch.library.opcheck(B._bias_act_op, (x, torch.randn(3), 1, 'lrelu', 0.2, math.sqrt(2), 0.5))
    torch.library.opcheck(B._bias_act_grad_op, (torch.randn(2, 3, 5, 6), x, torch.randn(3), 1, 'swish', 0.0, 1.4, -1.0))
    torch.library.opcheck(U._upfirdn2d_op, (x, f, 2, 2, 1, 1, 2, 1, 2, 1, False, 2.0))
    torch.library.opcheck(U._upfirdn2d_op, (x.contiguous(), f, 1, 1, 2, 2, -1, 1, 2, 1, True, 2.0))
    assert B.bias_act(x, torch.randn(3), act='relu').is_contiguous(memory_format=torch.channels_last)
    assert U.upsample2d(x, U.setup_filter([1, 3, 3, 1])).is_contiguous(memory_format=torch.channels_last)
    assert FL.filtered_lrelu(x, up=1).is_contiguous(memory_format=torch.channels_last)


def test_meta_tensors():
    x = torch.empty(2, 3, 16, 16, device='meta')
    f = torch.empty(4, 4, device='meta')
    assert U._upfirdn2d_op(x, f, 2, 2, 1, 1, 2, 1, 2, 1, False, 4.0).shape == (2, 3, 32, 32)
    assert B._bias_act_op(x, torch.empty(3, device='meta'), 1, 'lrelu', 0.2, 1.0, -1.0).shape == x.shape
    # The public functions on meta tensors (reference path) agree.
    assert U.upsample2d(x, U.setup_filter([1, 3, 3, 1], device='meta')).shape == (2, 3, 32, 32)
    assert FL.filtered_lrelu(x, up=2, fu=U.setup_filter([1, 3, 3, 1], device='meta'), padding=3).shape == (2, 3, 35, 35)


def test_compile_fullgraph(pretend_kernels):
    f = U.setup_filter([1, 3, 3, 1])

    def layer(x, w, styles, b):
        w = w[None] * styles[:, None, :, None, None]
        w = w * (w.square().sum([2, 3, 4], keepdim=True) + 1e-8).rsqrt()
        x = x.reshape(1, -1, *x.shape[2:])
        x = CR.conv2d_resample(x, w.reshape(-1, *w.shape[2:]), f, up=2, padding=1, groups=w.shape[0], flip_weight=False)
        x = x.reshape(styles.shape[0], -1, *x.shape[2:])
        x = B.bias_act(x, b, act='lrelu', clamp=256)
        return FL.filtered_lrelu(x, f, f, b, up=2, down=2, padding=3)

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    styles = torch.randn(2, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    y = compiled(x, w, styles, b)
    grads = torch.autograd.grad(y.square().sum(), [x, w, styles, b])
    y_eager = layer(x, w, styles, b)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), [x, w, styles, b])
    assert torch.allclose(y, y_eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, grads_eager):
        assert torch.allclose(g, ge, rtol=1e-4, atol=1e-4)


def test_compile_traces_the_real_dispatch(monkeypatch, fresh_build_state):
    # want_kernel / force_ref / kernel_available themselves must trace without graph breaks:
    # first on CPU tensors (reference), then with a GPU pretended and the build failing.
    f = U.setup_filter([1, 3, 3, 1])
    b = torch.ones(2)
    x = torch.randn(1, 2, 4, 4)
    layer = lambda x: U.upsample2d(B.bias_act(x, b, act='lrelu'), f)
    expected = U.upsample2d(B.bias_act(x, b, act='lrelu', impl='ref'), f, impl='ref')
    assert torch.allclose(torch.compile(layer, fullgraph=True, backend='aot_eager')(x), expected)

    def failing_load(name, sources, build_dir):
        raise RuntimeError('nvcc: simulated compiler failure')
    monkeypatch.setattr(_build, '_load', failing_load)
    monkeypatch.setattr(_build, 'want_kernel', lambda op, impl, *tensors: impl != 'ref')
    torch.compiler.reset()
    with pytest.warns(RuntimeWarning, match='could not build'):
        y = torch.compile(layer, fullgraph=True, backend='aot_eager')(x)
    assert torch.allclose(y, expected)
    assert _build._extensions == {'bias_act': None, 'upfirdn2d': None}


# --- first-use self-check: a kernel that builds but is wrong or cannot launch is never used ----

class _FakeBiasAct:
    """Stands in for the compiled bias_act extension: the kernel's maths from the reference, optionally broken."""

    def __init__(self, error: float = 0.0, raises: str = None):
        self.error, self.raises, self.calls = error, raises, 0

    def bias_act(self, x, b, dy, dim, act, alpha, gain, clamp):
        self.calls += 1
        if self.raises:
            raise RuntimeError(self.raises)
        name = [k for k, v in B.ACTIVATIONS.items() if v.index == act][0]
        out = B._bias_act_op(x, b, dim, name, alpha, gain, clamp) if dy is None else B._bias_act_grad_op(dy, x, b, dim, name, alpha, gain, clamp)
        return out * (1 + self.error)


class _FakeUpfirdn2d:
    def __init__(self, ignore_flip: bool = False):
        self.ignore_flip = ignore_flip

    def upfirdn2d(self, x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
        flip = False if self.ignore_flip else flip_filter
        return U._upfirdn2d_ref(x, f, (upx, upy), (downx, downy), (padx0, padx1, pady0, pady1), flip, gain)


@pytest.fixture
def fresh_self_checks(monkeypatch, fresh_build_state):
    monkeypatch.setattr(_build, '_self_check_passed', {})


def test_self_check_accepts_a_correct_kernel_once_per_device(fresh_self_checks, monkeypatch):
    fake = _FakeBiasAct()
    monkeypatch.setitem(_build._extensions, 'bias_act', fake)
    monkeypatch.setitem(_build._extensions, 'upfirdn2d', _FakeUpfirdn2d())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert _build.kernel_available('bias_act', B.SOURCES, torch.device('cpu'))
        calls = fake.calls
        assert calls == 10                        # 5 activations x (forward, gradient)
        assert _build.kernel_available('bias_act', B.SOURCES, torch.device('cpu'))
        assert fake.calls == calls                # checked once per device
        assert _build.kernel_available('upfirdn2d', U.SOURCES, torch.device('cpu'))     # incl. the adjoint (gradient) call


def test_self_check_passes_when_first_use_is_under_inference_mode(fresh_self_checks, monkeypatch):
    # Generation scripts may first call an op inside torch.inference_mode(): the checks'
    # reference gradients must still work there, or a correct kernel would be turned off.
    monkeypatch.setitem(_build._extensions, 'bias_act', _FakeBiasAct())
    monkeypatch.setitem(_build._extensions, 'upfirdn2d', _FakeUpfirdn2d())
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter('error')
        assert _build.kernel_available('bias_act', B.SOURCES, torch.device('cpu'))
        assert _build.kernel_available('upfirdn2d', U.SOURCES, torch.device('cpu'))


@pytest.mark.parametrize('fake, why', [
    (_FakeBiasAct(error=1e-3), r'bias_act \w+ forward: relative error'),
    (_FakeBiasAct(raises='CUDA error: no kernel image is available for execution on the device'), 'no kernel image is available'),
])
def test_self_check_rejects_a_wrong_or_unlaunchable_kernel(fresh_self_checks, monkeypatch, fake, why):
    monkeypatch.setitem(_build._extensions, 'bias_act', fake)
    with pytest.warns(RuntimeWarning, match=f'the bias_act CUDA kernel failed its self-check on cpu .*{why}.*using the slower PyTorch reference'):
        assert not _build.kernel_available('bias_act', B.SOURCES, torch.device('cpu'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')            # warned once
        assert not _build.kernel_available('bias_act', B.SOURCES, torch.device('cpu'))
    # Dispatch that would pick the kernel for these tensors runs the reference instead.
    monkeypatch.setattr(_build, 'want_kernel', lambda op, impl, *tensors: True)
    x, b = torch.randn(2, 3, 4, 4), torch.randn(3)
    fake.calls = 0
    assert torch.equal(B.bias_act(x, b, act='lrelu'), B.bias_act(x, b, act='lrelu', impl='ref')) and fake.calls == 0


def test_self_check_catches_a_wrong_filter_orientation(fresh_self_checks, monkeypatch):
    monkeypatch.setitem(_build._extensions, 'upfirdn2d', _FakeUpfirdn2d(ignore_flip=True))
    with pytest.warns(RuntimeWarning, match='upfirdn2d CUDA kernel failed its self-check'):
        assert not _build.kernel_available('upfirdn2d', U.SOURCES, torch.device('cpu'))


def test_stale_build_lock_times_out_and_the_op_falls_back(fresh_build_state, monkeypatch, tmp_path):
    build_dir = tmp_path / 'build'
    build_dir.mkdir()
    lock = build_dir / _build.LOCK_NAME
    lock.write_text('')
    os.utime(lock, (0, 0))                        # a lock left by a build killed long ago
    with pytest.raises(TimeoutError, match=f'{lock}: a build lock .* old .*delete it to rebuild'):
        _build.wait_for_build_lock(str(build_dir), timeout=60, poll=0.01)
    os.utime(lock, None)                          # a fresh lock: wait for it to go away
    import threading
    threading.Timer(0.1, lock.unlink).start()
    _build.wait_for_build_lock(str(build_dir), timeout=60, poll=0.01)
    assert not lock.exists()

    # Through the real build path, on a machine that looks CUDA-capable: the stale lock in
    # the extension's own build folder stops it before torch's builder (which would wait on
    # the lock forever) is reached, and the op falls back.
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.version, 'cuda', '12.4')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda *a: (9, 0))
    monkeypatch.setattr(cpp_extension, 'verify_ninja_availability', lambda: None)
    monkeypatch.setattr(cpp_extension, 'load', lambda **kwargs: pytest.fail('the builder ran despite the stale lock'))
    monkeypatch.setenv('NEXT3D_OPS_BUILD_TIMEOUT', '60')
    real_dir = fresh_build_state / 'torch_extensions' / f'bias_act-{_build.build_key("bias_act", B.SOURCES)}'
    real_dir.mkdir(parents=True)
    (real_dir / _build.LOCK_NAME).write_text('')
    os.utime(real_dir / _build.LOCK_NAME, (0, 0))
    with pytest.warns(RuntimeWarning, match='could not build the bias_act CUDA extension \\(TimeoutError: .*lock'):
        assert _build.get_extension('bias_act', B.SOURCES) is None
    assert _build.get_extension('bias_act', B.SOURCES) is None          # remembered: no second wait


def test_negative_gain_with_a_separable_filter_stays_real(pretend_kernels):
    # A 1-D filter (8 taps: separable by default) runs once per axis; the gain's sign must
    # be applied once, on both the kernel path and the reference.
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    f = U.setup_filter(np.arange(1.0, 9.0))
    assert f.ndim == 1
    expected = -U.upfirdn2d(x, f.ger(f), up=2, padding=4, gain=3.0, impl='ref')
    for impl in (None, 'ref'):
        got = U.upfirdn2d(x, f, up=2, padding=4, gain=-3.0, impl=impl)
        assert not got.is_complex()
        torch.testing.assert_close(got, expected.to(got.dtype))
    # Without upsampling the reference filters with two strided depthwise convolutions.
    expected = -U.upfirdn2d(x, f.ger(f), down=2, padding=[4, 3, 3, 4], gain=3.0, impl='ref')
    for impl in (None, 'ref'):
        torch.testing.assert_close(U.upfirdn2d(x, f, down=2, padding=[4, 3, 3, 4], gain=-3.0, impl=impl), expected)
    f2 = U.setup_filter([1, 3, 3, 1])                        # 4 taps: made 2-D
    assert f2.ndim == 2 and not U.upfirdn2d(x, f2, up=2, padding=2, gain=-3.0).is_complex()


def test_setup_filter_refuses_a_negative_gain_for_a_separable_filter():
    # A separable filter is applied on both axes: a negative gain cannot be baked into it.
    with pytest.raises(ValueError, match='negative gain'):
        U.setup_filter(np.arange(1.0, 9.0), gain=-2.0)
    torch.testing.assert_close(U.setup_filter([1, 1], gain=-4.0), torch.full([2, 2], -1.0))
    torch.testing.assert_close(U.setup_filter(np.ones(8), gain=4.0), torch.full([8], 0.25))


# --- per-call work of the kernel paths (the CUDA plugin itself cannot run here) ----------

class _RecordingUpfirdn2dOp:
    """Stands in for the op call of the CUDA path: records the filters it gets."""

    def __init__(self):
        self.op, self.filters = U._upfirdn2d_call, []

    def __call__(self, x, f, *args):
        self.filters.append(f)
        return self.op(x, f, *args)


def test_upfirdn2d_kernel_path_prepares_no_filter_per_call(pretend_kernels, monkeypatch):
    rec = _RecordingUpfirdn2dOp()
    monkeypatch.setattr(U, '_upfirdn2d_call', rec)
    x = torch.randn(2, 3, 6, 7)
    for _ in range(3):
        torch.testing.assert_close(U.upfirdn2d(x, None, up=2, padding=1), U.upfirdn2d(x, None, up=2, padding=1, impl='ref'))
    first = rec.filters[0]
    assert len(rec.filters) == 3 and all(f is first for f in rec.filters)     # f=None: one identity filter, reused
    # Filters reach the kernel as given (it reads them flipped and applies the gain itself):
    # a 2-D filter is the caller's tensor, a 1-D one views of it, no copies.
    f2, f1 = U.setup_filter([1, 3, 3, 1]), U.setup_filter(list(range(1, 9)))
    rec.filters.clear()
    U.upfirdn2d(x, f2, down=2, padding=1, gain=2.0)
    U.upfirdn2d(x, f1, padding=4, gain=-3.0)
    assert rec.filters[0] is f2 and [f.data_ptr() for f in rec.filters[1:]] == [f1.data_ptr()] * 2
    # The cache is keyed safely: written into, the identity filter is made again; per device.
    first.mul_(2)
    torch.testing.assert_close(U.upfirdn2d(x, None), x)
    assert rec.filters[-1] is not first and torch.equal(rec.filters[-1], torch.ones(1, 1))
    U.upfirdn2d(torch.empty(1, 1, 4, 4, device='meta'), None)
    assert rec.filters[-1].device.type == 'meta'
    # Made first under inference_mode (e.g. by a metric), it still serves a training step.
    monkeypatch.setattr(misc, '_device_constants', {})
    with torch.inference_mode():
        U.upfirdn2d(x, None, up=2)
    xg = x.clone().requires_grad_(True)
    U.upfirdn2d(xg, None, up=2).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))


def test_bias_act_kernel_path_passes_its_operands_as_they_are(pretend_kernels, monkeypatch):
    # Odd strides where a size is 1 are no reason to copy (the kernel ignores them; see test_ops_gpu).
    seen = []
    op = B._bias_act_call
    monkeypatch.setattr(B, '_bias_act_call', lambda x, b, *args: seen.append((x, b)) or op(x, b, *args))
    x = torch.randn(135).as_strided((3, 5, 1, 9), (45, 9, 777, 1))
    b = torch.randn(5)
    y = B.bias_act(x, b, act='lrelu')
    assert len(seen) == 1 and seen[0][0] is x and seen[0][1] is b
    torch.testing.assert_close(y, B.bias_act(x, b, act='lrelu', impl='ref'))


def test_kernel_path_runs_functions_in_eager_mode_and_the_ops_under_compile(pretend_kernels):
    # Eager mode: plain autograd Functions (a torch.library op costs more host time per call);
    # torch.compile: the registered ops, which it traces with their fake kernels.
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    f = U.setup_filter([1, 3, 3, 1])

    def fn(x, b):
        return U.upsample2d(B.bias_act(x, b, act='lrelu'), f)
    y = fn(x, b)
    assert type(y.grad_fn).__name__ == '_Upfirdn2dFunctionBackward'
    assert type(y.grad_fn.next_functions[0][0]).__name__ == '_BiasActFunctionBackward'
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == 'call_function')
        return gm.forward
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recording_backend, fullgraph=True)
    torch.testing.assert_close(compiled(x, b), y)
    assert 'next3d.bias_act.default' in targets and 'next3d.upfirdn2d.default' in targets
    assert not any('Function' in t for t in targets)
    torch._dynamo.reset()
