"""CUDA kernels against the references (needs a GPU; skipped without one).

Tolerances (max abs error relative to the largest reference value): float64 1e-10,
float32 1e-5, float16 1e-2, bfloat16 2e-2 (its 8-bit mantissa alone gives ~4e-3 per
rounding). The reference is evaluated in float64 on the same (rounded) inputs.
"""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torch_utils.ops import _build
from torch_utils.ops import bias_act as B
from torch_utils.ops import conv2d_resample as CR
from torch_utils.ops import filtered_lrelu as FL
from torch_utils.ops import upfirdn2d as U

pytestmark = pytest.mark.gpu

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def assert_close(got: torch.Tensor, ref: torch.Tensor, tol: float):
    assert got.shape == ref.shape
    err = (got.double() - ref.double()).abs().max().item()
    scale = max(ref.double().abs().max().item(), 1.0)
    assert err <= tol * scale, f'max error {err:.3g} > {tol:.1g} * {scale:.3g}'


@pytest.fixture(scope='module', autouse=True)
def built_extensions():
    """Build both extensions up front; a build failure here is a test failure, not a fallback."""
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert _build.get_extension('bias_act', B.SOURCES) is not None
        assert _build.get_extension('upfirdn2d', U.SOURCES) is not None


@pytest.fixture
def reference_only(monkeypatch):
    """A context in which every op, even those without an impl argument, runs its reference."""
    class Context:
        def __enter__(self):
            monkeypatch.setenv('NEXT3D_OPS_REF', '1')

        def __exit__(self, *exc):
            monkeypatch.delenv('NEXT3D_OPS_REF')
    return Context()


def _inputs(shape, dtype, channels_last=False, seed=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    x = torch.randn(shape, device='cuda', dtype=torch.float64, generator=g).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('act', sorted(B.ACTIVATIONS))
def test_bias_act_forward(dtype, act):
    for shape, dim, channels_last in [((3, 5, 7, 9), 1, False), ((3, 5, 7, 9), 1, True), ((6, 33), 1, False), ((4, 3, 10), 2, False)]:
        x = _inputs(shape, dtype, channels_last) * 2
        b = _inputs([shape[dim]], dtype, seed=1)
        for clamp in (None, 0.5):
            y = B.bias_act(x, b, dim=dim, act=act, clamp=clamp, impl='cuda')
            assert y.dtype == dtype and y.stride() == x.stride()
            ref = B.bias_act(x.double(), b.double(), dim=dim, act=act, clamp=clamp, impl='ref')
            assert_close(y, ref, TOL[dtype])


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('act', sorted(B.ACTIVATIONS))
def test_bias_act_backward(dtype, act):
    x = _inputs((3, 5, 7, 9), dtype) * 2
    b = _inputs([5], dtype, seed=1)
    # Exact zeros of x + b (several in bfloat16, whose mantissa has 8 bits) sit on the kink of
    # relu and lrelu. The kernel takes PyTorch's side there (act'(0) = 0, resp. alpha), but the
    # reference computes gain * x + gain * b, which rounds to a tiny value of either sign (as
    # seen on an H200): moved off the kink (2x + b = -b).
    x = torch.where(x.double() + b.double().reshape(1, -1, 1, 1) == 0, x * 2, x).requires_grad_(True)
    b.requires_grad_(True)
    dy = _inputs((3, 5, 7, 9), dtype, seed=2)
    # In half precision an output rounded across the clamp boundary flips its gradient
    # between 0 and full size, so the clamp is checked in float32/float64 only.
    clamp = 0.8 if dtype in (torch.float32, torch.float64) else None
    gx, gb = torch.autograd.grad(B.bias_act(x, b, act=act, clamp=clamp, impl='cuda'), [x, b], dy)
    xr, br = x.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    rx, rb = torch.autograd.grad(B.bias_act(xr, br, act=act, clamp=clamp, impl='ref'), [xr, br], dy.double())
    assert_close(gx, rx, TOL[dtype])
    assert_close(gb, rb, TOL[dtype] * 10)      # a sum over 3 * 7 * 9 terms in the output dtype


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('act', ['relu', 'lrelu'])
def test_bias_act_kernel_gradient_at_the_kink(dtype, act):
    # x + b == 0 exactly (test_bias_act_backward keeps off it): the kernel takes PyTorch's side,
    # act'(0) = 0 for relu and alpha for lrelu.
    b = torch.tensor([0.5, -1.25, 3.0], device='cuda', dtype=dtype)
    x = (-b).reshape(1, 3, 1, 1).repeat(2, 1, 4, 5).requires_grad_(True)
    dy = _inputs(x.shape, dtype, seed=4)
    spec = B.ACTIVATIONS[act]
    got, = torch.autograd.grad(B.bias_act(x, b, act=act, impl='cuda'), [x], dy)
    slope = 0.0 if act == 'relu' else spec.alpha
    assert_close(got, dy.double() * slope * spec.gain, TOL[dtype])


@pytest.mark.parametrize('act', sorted(B.ACTIVATIONS))
def test_bias_act_gradcheck(act):
    x = _inputs((2, 3, 4), torch.float64)
    x = (x.sign() * (x.abs() + 0.05)).requires_grad_(True)
    b = (0.01 * _inputs([3], torch.float64, seed=1)).requires_grad_(True)
    fn = lambda x, b: B.bias_act(x, b, act=act, alpha=0.25, gain=1.3, clamp=0.7, impl='cuda')
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


UPFIRDN_CASES = [
    # up, down, padding, flip_filter, gain, taps
    (1, 1, 1, False, 1.0, [1, 2, 1]),
    (2, 1, [2, 1, 2, 1], False, 4.0, [1, 3, 3, 1]),
    (1, 2, [1, 1, 1, 1], True, 1.0, [1, 3, 3, 1]),
    (4, 1, [1, -2, 3, 0], False, 2.5, [[1, 0.5], [-2, 3], [0.25, 1]]),
    (1, 4, [-1, 2, 0, -1], True, 0.5, [[1, 2, 3, 4, 5]]),
    ((1, 2), (2, 1), [1, 2, -1, 1], False, 1.0, [1, 2, 3, 4, 5, 6, 7, 8]),
    (4, 2, [3, 2, 1, 0], True, 1.0, [[2, 1, 0], [1, 3, 1], [0, 1, 4]]),
    (2, 2, [5, 6, 5, 6], False, 4.0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
]


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('up, down, padding, flip_filter, gain, taps', UPFIRDN_CASES)
def test_upfirdn2d_forward_backward(dtype, up, down, padding, flip_filter, gain, taps):
    f = U.setup_filter(taps, device='cuda')     # normalized: float16 must not overflow
    for channels_last in (False, True):
        x = _inputs((2, 5, 11, 13), dtype, channels_last).requires_grad_(True)
        y = U.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain, impl='cuda')
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        xr = x.detach().double().requires_grad_(True)
        ref = U.upfirdn2d(xr, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain, impl='ref')
        assert_close(y, ref, TOL[dtype])
        dy = _inputs(y.shape, dtype, seed=3)
        assert_close(torch.autograd.grad(y, [x], dy)[0], torch.autograd.grad(ref, [xr], dy.double())[0], TOL[dtype])


@pytest.mark.parametrize('up, down, padding, flip_filter, gain, taps', UPFIRDN_CASES[:7])
def test_upfirdn2d_gradcheck(up, down, padding, flip_filter, gain, taps):
    f = U.setup_filter(taps, device='cuda', normalize=False)
    x = _inputs((1, 2, 5, 6), torch.float64).requires_grad_(True)
    fn = lambda x: U.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain, impl='cuda')
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_upfirdn2d_strided_input():
    # A non-contiguous view (every other column) is read through its strides.
    x = _inputs((2, 3, 9, 20), torch.float32)[:, :, :, ::2]
    f = U.setup_filter([1, 3, 3, 1], device='cuda')
    assert_close(U.upsample2d(x, f, impl='cuda'), U.upsample2d(x.double(), f, impl='ref'), 1e-5)


@pytest.mark.parametrize('dtype', DTYPES)
def test_filtered_lrelu_and_conv2d_resample(dtype, reference_only):
    fu = U.setup_filter([1, 3, 3, 1], device='cuda')
    fd = U.setup_filter(list(range(1, 13)), device='cuda')
    x = _inputs((2, 4, 12, 12), dtype)
    b = _inputs([4], dtype, seed=1)
    for up, down, padding, clamp in [(2, 2, [7, 6, 7, 6], None), (1, 2, 5, 0.5), (4, 1, [2, 1, 2, 1], 1.0), (1, 1, 0, None)]:
        y = FL.filtered_lrelu(x, fu, fd if down > 1 else None, b, up=up, down=down, padding=padding, clamp=clamp, impl='cuda')
        ref = FL.filtered_lrelu(x.double(), fu, fd if down > 1 else None, b.double(), up=up, down=down, padding=padding, clamp=clamp, impl='ref')
        assert_close(y, ref, TOL[dtype])
    w = _inputs((6, 4, 3, 3), dtype, seed=2)
    for up, down in [(1, 1), (2, 1), (1, 2)]:
        y = CR.conv2d_resample(x, w, fu, up=up, down=down, padding=1)
        with reference_only:
            ref = CR.conv2d_resample(x.double(), w.double(), fu, up=up, down=down, padding=1)
        assert_close(y, ref, 5 * TOL[dtype])     # cuDNN's own conv rounding comes on top


def test_filtered_lrelu_gradcheck():
    f = U.setup_filter([1, 3, 3, 1], device='cuda')
    x = _inputs((1, 2, 4, 5), torch.float64)
    x = (x.sign() * (x.abs() + 0.05)).requires_grad_(True)
    b = torch.zeros(2, device='cuda', dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: FL.filtered_lrelu(x, f, f, b, up=2, down=2, padding=[3, 2, 3, 2], clamp=0.8, impl='cuda')
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


class ModulatedConvLayer(torch.nn.Module):
    """A StyleGAN2-style synthesis layer: modulated, demodulated 3x3 conv with 2x upsampling
    (grouped conv2d_resample), noise via fma, bias + lrelu + clamp via bias_act."""

    def __init__(self, in_channels=8, out_channels=8, w_dim=16):
        super().__init__()
        self.affine = torch.nn.Linear(w_dim, in_channels)
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = torch.nn.Parameter(torch.tensor(0.1))
        self.register_buffer('resample_filter', U.setup_filter([1, 3, 3, 1]))

    def forward(self, x, ws, noise):
        from torch_utils.ops.fma import fma
        batch = x.shape[0]
        styles = self.affine(ws) + 1
        w = self.weight[None] * styles[:, None, :, None, None]
        w = w * (w.square().sum([2, 3, 4], keepdim=True) + 1e-8).rsqrt()
        x = x.reshape(1, -1, *x.shape[2:])
        x = CR.conv2d_resample(x, w.reshape(-1, *w.shape[2:]).to(x.dtype), self.resample_filter, up=2, padding=1,
                               groups=batch, flip_weight=False)
        x = x.reshape(batch, -1, *x.shape[2:])
        x = fma(noise.to(x.dtype), self.noise_strength.to(x.dtype), x)
        return B.bias_act(x, self.bias.to(x.dtype), act='lrelu', clamp=256)


def test_compile_fullgraph_modulated_conv(reference_only):
    torch.manual_seed(0)
    layer = ModulatedConvLayer().cuda()
    x = torch.randn(2, 8, 16, 16, device='cuda', requires_grad=True)
    ws = torch.randn(2, 16, device='cuda')
    noise = torch.randn(2, 1, 32, 32, device='cuda')
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x, ws, noise)
    grads = torch.autograd.grad(y.square().mean(), [x] + list(layer.parameters()))
    y_eager = layer(x, ws, noise)
    grads_eager = torch.autograd.grad(y_eager.square().mean(), [x] + list(layer.parameters()))
    with reference_only:
        y_ref = layer(x, ws, noise)
        grads_ref = torch.autograd.grad(y_ref.square().mean(), [x] + list(layer.parameters()))
    for a, b in [(y, y_eager), (y, y_ref)] + list(zip(grads, grads_eager)) + list(zip(grads, grads_ref)):
        assert_close(a, b, 1e-4)      # float32; tests/conftest.py turns TF32 off (cuDNN has it on by default)


def test_r1_second_derivative_matches_reference(reference_only):
    # R1 needs d/dparams of |dD/dx|^2: the ops' backward must itself be differentiable.
    torch.manual_seed(0)
    f = U.setup_filter([1, 3, 3, 1], device='cuda')
    w = torch.randn(4, 3, 3, 3, device='cuda', dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device='cuda', dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 8, 8, device='cuda', dtype=torch.float64, requires_grad=True)

    def penalty(impl):
        h = CR.conv2d_resample(x, w, f, down=2, padding=1)
        h = B.bias_act(h, b, act='lrelu', impl=impl)
        h = FL.filtered_lrelu(h, f, f, up=2, down=2, padding=[3, 2, 3, 2], impl=impl)
        score = h.square().sum()
        gx, = torch.autograd.grad(score, [x], create_graph=True)
        return gx.square().sum()

    grads = torch.autograd.grad(penalty(None), [w, b])
    with reference_only:
        grads_ref = torch.autograd.grad(penalty(None), [w, b])
    for g, gr in zip(grads, grads_ref):
        assert_close(g, gr, 1e-9)


# --- the extensions' own argument handling (what review found; each would have failed on the
# .cu files before commit bf7b12b) ---------------------------------------------------------

class _Copies(TorchDispatchMode):
    """Counts tensor copies, including those the C++ extensions make (they go through the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_bias_act_kernel_copies_no_operand_whose_strides_differ_only_in_size1_dims():
    ext = _build.get_extension('bias_act', B.SOURCES)
    shape, strides = (3, 5, 1, 9), (45, 9, 777, 1)                   # dense; odd stride where the size is 1
    x = _inputs([135], torch.float32).as_strided(shape, strides)
    dy = _inputs([135], torch.float32, seed=2).as_strided(shape, (45, 9, 12345, 1))
    b = _inputs([5], torch.float32, seed=1)
    spec = B.ACTIVATIONS['swish']
    args = (1, spec.index, spec.alpha, spec.gain, -1.0)
    with _Copies() as copies:
        y = ext.bias_act(x, b, None, *args)
        dx = ext.bias_act(x, b, dy, *args)
    assert copies.count == 0
    xr = x.double().requires_grad_(True)
    ref = B._bias_act_ref(xr, b.double(), 1, 'swish', spec.alpha, spec.gain, -1.0)
    assert_close(y, ref, TOL[torch.float32])
    assert_close(dx, torch.autograd.grad(ref, xr, dy.double())[0], TOL[torch.float32])


def test_bias_act_kernel_checks_shapes_on_empty_input():
    ext = _build.get_extension('bias_act', B.SOURCES)
    spec = B.ACTIVATIONS['lrelu']
    args = (1, spec.index, spec.alpha, spec.gain, -1.0)
    for shape in ((2, 5, 3), (0, 5, 3)):
        x = torch.zeros(shape, device='cuda')
        with pytest.raises(RuntimeError, match=r'bias_act: b must have shape \[x.shape\[dim\]\]'):
            ext.bias_act(x, torch.zeros(4, device='cuda'), None, *args)
        with pytest.raises(RuntimeError, match="bias_act: dy must have x's shape"):
            ext.bias_act(x, None, torch.zeros(1, 4, 3, device='cuda'), *args)


@pytest.mark.parametrize('up, down, padding', [
    (1, (2 ** 31 + 1, 1), 0),               # a factor that wraps around in 32 bits
    (1, 1, (2 ** 30, 0, 0, 0)),             # padding
    (1, 1, (0, 0, 2 ** 62, 2 ** 62)),       # padding whose sum overflows 64 bits (was 'empty output')
    ((2 ** 29, 1), 1, 0),                   # in_w * up
])
def test_upfirdn2d_kernel_refuses_what_32_bit_coordinates_cannot_hold(up, down, padding):
    ext = _build.get_extension('upfirdn2d', U.SOURCES)
    x = _inputs((1, 1, 4, 4), torch.float32)
    f = torch.ones(1, 1, device='cuda')
    (upx, upy), (downx, downy), pad = U.parse_scaling(up), U.parse_scaling(down), U.parse_padding(padding)
    with pytest.raises(RuntimeError, match='too large for 32-bit coordinates'):
        ext.upfirdn2d(x, f, upx, upy, downx, downy, *pad, False, 1.0)
