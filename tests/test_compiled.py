"""torch_utils/compiled.py: torch.compile with a self-check against eager and a fallback that works.

The compilers are real where they are fast enough for the suite (aot_eager on the tiny
networks, inductor on a small module); a wrong or failing compiler is simulated by
replacing torch.compile.
"""

import warnings

import pytest
import torch
import torch._dynamo.config

from torch_utils import compiled
from training import configs
from tests import train_helpers as th
from training import training_loop as tl
from training.loss import Next3DLoss
from training.training_loop import setup_phases

_TORCH_VERSION = tuple(int(n) for n in torch.__version__.split('+')[0].split('.')[:2])

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


def _fallback_is_an_error():
    """Inside warnings.catch_warnings(): our fallback warning raises. Only ours: torch warns of its
    own accord in places (on Python 3.13.0, 'Guards may run slower') and must not fail a call."""
    warnings.filterwarnings('error', message='torch.compile: ', category=RuntimeWarning)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with dynamo's caches empty: its recompile limit (8) counts the graphs of a function
    over the whole process, and the suite traces the same networks' code with many shapes."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


class Noisy(torch.nn.Module):
    """A conv, random noise, a running-mean buffer written in forward, and a method to compile."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer('running', torch.zeros(4))

    def forward(self, x, scale: float = 1.0):
        y = self.conv(x) * scale + torch.randn(x.shape[0], 4, 1, 1, device=x.device) * 0.1
        with torch.no_grad():
            self.running.mul_(0.5).add_(y.mean(dim=(0, 2, 3)) * 0.5)
        return dict(out=torch.tanh(y), mean=y.mean())

    def head(self, x):
        return self.conv(x).sum(dim=1)


def run_twice(fn, module, seed=0):
    """Outputs, buffer and conv gradient of two calls from a fixed seed."""
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 8, 8)
    outs = []
    module.zero_grad(set_to_none=True)
    for scale in (1.0, 1.0):
        o = fn(x, scale=scale)
        (o['out'].square().sum() + o['mean']).backward()
        outs.append(o['out'].detach())
    return outs, module.running.clone(), module.conv.weight.grad.clone(), torch.randn(3)


def test_compiled_matches_eager_and_checks_each_signature_once():
    torch.manual_seed(1)
    eager_module = Noisy()
    compiled_module = Noisy()
    compiled_module.load_state_dict(eager_module.state_dict())
    lines = []
    fast = compiled.Compiled(compiled_module, compiled_module, 'noisy', backend='aot_eager', log=lines.append)
    want = run_twice(eager_module, eager_module)
    got = run_twice(fast, compiled_module)
    for g, w in zip(got[0], want[0]):           # same random noise: eager's generator
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)     # the buffer written once per call, not twice
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)     # gradients accumulate once
    torch.testing.assert_close(got[3], want[3])                           # the RNG stream continues as in eager
    assert len(lines) == 1 and 'noisy compiled for a new input signature in' in lines[0] and 'matches eager' in lines[0]
    fast(torch.randn(1, 3, 8, 8))               # a new shape: checked again
    assert len(lines) == 2 and fast.failed is None
    with torch.no_grad():                       # no grad mode: a new signature too
        fast(torch.randn(1, 3, 8, 8))
    assert len(lines) == 3 and fast.compile_seconds > 0


def test_a_method_of_a_module_compiles_with_the_modules_parameters():
    module = Noisy()
    fast = compiled.Compiled(module.head, module, 'head', backend='aot_eager', log=lambda *a: None)
    x = torch.randn(2, 3, 8, 8)
    fast(x).sum().backward()
    g = module.conv.weight.grad.clone()
    module.zero_grad(set_to_none=True)
    module.head(x).sum().backward()
    torch.testing.assert_close(g, module.conv.weight.grad)
    assert fast.failed is None


def test_the_same_shape_with_other_strides_is_checked_again():
    """Dynamo compiles a new graph for a channel slice of the same shape; that graph is checked too."""
    module = torch.nn.Conv2d(3, 4, 3, padding=1)
    lines = []
    fast = compiled.Compiled(module, module, 'conv', backend='aot_eager', log=lines.append)
    fast(torch.randn(2, 3, 8, 8))
    x = torch.randn(2, 6, 8, 8)[:, :3]
    torch.testing.assert_close(fast(x), module(x))
    assert len(lines) == 2 and fast.failed is None, lines


def test_inductor_compiles_a_small_module():
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1))
    lines = []
    fast = compiled.Compiled(module, module, 'mlp', backend='inductor', log=lines.append)
    x = torch.randn(4, 8)
    for _ in range(2):                          # the checked first call, then the compiled graph alone
        out = fast(x)
        torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-6)
        module.zero_grad(set_to_none=True)
        out.square().sum().backward()
        got = [p.grad.clone() for p in module.parameters()]
        module.zero_grad(set_to_none=True)
        module(x).square().sum().backward()
        for g, p in zip(got, module.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    assert fast.failed is None, fast.failed
    assert len(lines) == 1 and 'matches eager' in lines[0]


def fake_compile(wrap):
    """A torch.compile stand-in whose compiled function is wrap(fn)."""
    def compile(fn, backend=None, **kwargs):
        return wrap(fn)
    return compile


def wrong_output(fn):
    return lambda *a, **k: {key: v * 1.01 for key, v in fn(*a, **k).items()}


def wrong_gradient(fn):
    def call(*a, **k):
        out = fn(*a, **k)
        return {key: v.detach() + (v - v.detach()) * 2 for key, v in out.items()}
    return call


def cannot_compile(fn):
    def call(*a, **k):
        raise RuntimeError('CppCompileError: C++ compile error\nmore lines')
    return call


def identity_with_backward(on_backward):
    """An autograd Function: the identity, whose backward calls on_backward() first."""
    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            on_backward()
            return g
    return Identity


def cannot_build_backward(fn):
    def fail():
        raise RuntimeError('backward compile failed')
    broken = identity_with_backward(fail)
    return lambda *a, **k: {key: broken.apply(v) for key, v in fn(*a, **k).items()}


def draws_once_more(fn):
    """Outputs and gradients as eager's, with one more (unused) draw from the CPU generator after the forward."""
    def call(*a, **k):
        out = fn(*a, **k)
        torch.rand(1)
        return out
    return call


def draws_in_backward(fn):
    """Outputs and gradients as eager's, with one (unused) draw from the CPU generator in each output's backward,
    as torch 2.7.1's cudagraphs backend runs a forward's draw again there."""
    draws = identity_with_backward(lambda: torch.rand(1))
    return lambda *a, **k: {key: draws.apply(v) for key, v in fn(*a, **k).items()}


@pytest.mark.parametrize('wrap, why', [
    (wrong_output, 'failed its check against eager (CompileCheckFailed: output error'),
    (wrong_gradient, 'failed its check against eager (CompileCheckFailed: gradient error'),
    (cannot_compile, 'failed to compile (RuntimeError: CppCompileError: C++ compile error)'),
    (cannot_build_backward, 'failed its check against eager (RuntimeError: backward compile failed)'),
    # Every later draw of the run would be another than eager's (the last item of run_twice).
    (draws_once_more, "failed its check against eager (CompileCheckFailed: its forward draws other random numbers than eager's"),
    (draws_in_backward, "failed its check against eager (CompileCheckFailed: its backward draws random numbers that eager's does not"),
])
def test_a_wrong_or_failing_compiler_warns_once_and_falls_back_to_eager(monkeypatch, wrap, why):
    monkeypatch.setattr(torch, 'compile', fake_compile(wrap))
    torch.manual_seed(1)
    eager_module = Noisy()
    compiled_module = Noisy()
    compiled_module.load_state_dict(eager_module.state_dict())
    fast = compiled.Compiled(compiled_module, compiled_module, 'noisy', log=lambda *a: None)
    want = run_twice(eager_module, eager_module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        got = run_twice(fast, compiled_module)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and messages[0].startswith(f'torch.compile: noisy {why}'), messages
    assert messages[0].endswith('running it eagerly from now on.') and '\n' not in messages[0]
    for g, w in zip(got[0], want[0]):           # the eager results, buffers written once, same RNG stream
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3])
    assert fast.failed is not None


class Cancelling(torch.nn.Module):
    """s's gradient is a small difference of two large sums (as a noise strength's is): rounding moves it by
    ~1% relative, far beyond GRADIENT_TOL; `reassociated` is the same function summed otherwise, and with
    wrong_w its w gradient doubled (the output unchanged)."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(0.7))
        self.w = torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(2)))

    def forward(self, x):
        return dict(out=self.s * x - self.s * (x * (1 - 1e-5)) + self.w * x)

    def reassociated(self, x, wrong_w=False):
        wx = self.w * x
        return dict(out=self.s * (x * 1e-5) + (wx * 2 - wx.detach() if wrong_w else wx))


@pytest.mark.parametrize('wrong_w', [False, True])
def test_a_gradient_is_judged_against_eagers_own_sensitivity(monkeypatch, wrong_w):
    """A compiled graph that only sums in another order passes although s's gradient moves by > GRADIENT_TOL
    (eager's own s gradient moves by a third of that when the weights and inputs move by NUDGE); one whose w
    gradient is wrong falls back."""
    monkeypatch.setattr(torch, 'compile', fake_compile(lambda module: lambda x: module.reassociated(x, wrong_w)))
    module = Cancelling()
    weights = [p.detach().clone() for p in module.parameters()]
    lines = []
    fast = compiled.Compiled(module, module, 'cancelling', log=lines.append)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    caller = torch.dot(module.w, x.requires_grad_(True))     # a graph of the caller's that saved w
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = fast(x)
    caller.backward()                                         # w was not written in place by the check
    torch.testing.assert_close(x.grad, weights[1])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    torch.testing.assert_close(out['out'], module(x)['out'], rtol=1e-4, atol=1e-4)
    assert all(torch.equal(p, w) for p, w in zip(module.parameters(), weights))      # the nudged weights restored
    if not wrong_w:
        assert not messages and fast.failed is None, messages
        assert len(lines) == 1 and "at s, within 10x the largest change of eager's for weights and inputs x (1 +- 1e-05)" in lines[0], lines
        error = float(lines[0].split('gradient error ')[1].split(' ')[0])
        assert error > compiled.GRADIENT_TOL          # the plain tolerance alone would have refused it
    else:
        assert len(messages) == 1 and 'CompileCheckFailed: gradient error 1 at w > 0.001 and > 10 x ' in messages[0], messages
        assert fast.failed is not None


class Kinked(torch.nn.Module):
    """s's gradient counts the inputs above their thresholds, and x[k] sits on its own: a nudge moves the
    gradient by one count or not at all as x[k]'s sign falls (pixel coverage and importance samples make
    Next3D's gradients so). `with_error(e)` is the same function with e more at x[k] in s's gradient."""

    def __init__(self, x, k):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(1.5))
        thresholds = x + torch.where(torch.arange(len(x)) % 2 == 0, -1.0, 1.0)
        thresholds[k] = x[k]
        self.register_buffer('thresholds', thresholds)
        self.k = k

    def forward(self, x):
        return dict(out=self.s * (x > self.thresholds).to(x.dtype))

    def with_error(self, x, e):
        at_k = torch.zeros_like(x)
        at_k[self.k] = e
        return dict(out=self.s * (x > self.thresholds).to(x.dtype) + (self.s - self.s.detach()) * at_k)


@pytest.mark.parametrize('error', [2.0, 100.0])
def test_eagers_sensitivity_is_the_largest_over_several_nudges(monkeypatch, error):
    """The first nudge leaves x[k] below its threshold (s's gradient does not move), the second lifts it
    (the gradient moves by one count): a compiled gradient off by twice that passes, one off by 100 times
    falls back after NUDGES nudges."""
    x = torch.rand(8, generator=torch.Generator().manual_seed(4)) + 0.5
    signs = [torch.randint(0, 2, x.shape, generator=compiled.nudge_generator(a)) * 2 - 1 for a in range(2)]
    k = next(i for i in range(len(x)) if signs[0][i] < 0 and signs[1][i] > 0)
    module = Kinked(x, k)
    monkeypatch.setattr(torch, 'compile', fake_compile(lambda m: lambda x: m.with_error(x, error)))
    lines = []
    fast = compiled.Compiled(module, module, 'kinked', log=lines.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fast(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if error == 2.0:
        assert not messages and fast.failed is None and len(lines) == 1, messages
    else:
        assert len(messages) == 1 and 'gradient error' in messages[0] and f'in {compiled.NUDGES} nudges' in messages[0], messages
    monkeypatch.setattr(compiled, 'NUDGES', 1)           # the first nudge alone would have refused the first
    monkeypatch.setattr(torch, 'compile', fake_compile(lambda m: lambda x: m.with_error(x, 2.0)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        compiled.Compiled(module, module, 'kinked', log=lines.append)(x)
    assert any('gradient error' in str(w.message) for w in caught)


def test_a_compiler_error_on_a_later_call_falls_back(monkeypatch):
    calls = []

    def later_fails(fn):
        def call(*a, **k):
            calls.append(1)
            if len(calls) > 2:         # the first call runs it twice (check, then the call returned)
                raise torch._dynamo.exc.TorchDynamoException('recompile failed')
            return fn(*a, **k)
        return call

    monkeypatch.setattr(torch, 'compile', fake_compile(later_fails))
    module = Noisy()
    fast = compiled.Compiled(module, module, 'noisy', log=lambda *a: None)
    x = torch.randn(2, 3, 8, 8)
    fast(x)
    with pytest.warns(RuntimeWarning, match=r'noisy failed to compile \(TorchDynamoException: recompile failed\)'):
        out = fast(x)
    assert out['out'].shape == (2, 4, 8, 8) and fast.failed is not None


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="backend 'tvm' is not one we use"):
        compiled.Compiled(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 'x', backend='tvm')
    with pytest.raises(ValueError, match="--compile='GD': expected one of none, D, G, all"):
        Next3DLoss.compile_networks(None, 'GD')


# --- the cudagraphs backend (on the CPU: traced graphs with eager kernels, no capture) ------------

def test_cudagraphs_backend_matches_eager_and_checks_a_call_after_the_recording_runs(monkeypatch):
    """Each new signature runs RECORD_RUNS times (forward and backward) before the call compared with eager,
    so that on a GPU the compared call is a replay; results as eager's."""
    exercised = []
    real_exercise = compiled._exercise
    monkeypatch.setattr(compiled, '_exercise', lambda out, module, inputs: (exercised.append(1), real_exercise(out, module, inputs)))
    torch.manual_seed(1)
    eager_module, compiled_module = Noisy(), Noisy()
    compiled_module.load_state_dict(eager_module.state_dict())
    lines = []
    fast = compiled.Compiled(compiled_module, compiled_module, 'noisy', backend='cudagraphs', log=lines.append)
    want = run_twice(eager_module, eager_module)
    got = run_twice(fast, compiled_module)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    if _TORCH_VERSION == (2, 7):
        # torch 2.7.1's cudagraphs backend runs the forward's draw again in the backward (2.6.0 and 2.8.0
        # on do not): the check refuses the module, and eager runs it.
        assert 'its backward draws random numbers' in fast.failed
        return
    assert fast.failed is None and len(fast.checked) == 1
    assert len(exercised) == compiled.RECORD_RUNS == 2      # for the one signature only, not for the second call
    assert len(lines) == 1 and 'matches eager' in lines[0]
    # On the CPU cudagraph trees capture nothing, and the line says so (the forward graph; its backward follows it).
    assert lines[0].endswith('; CUDA graphs: 1 traced, 1 (forward or backward) not captured (torch\'s log says why)'), lines[0]
    assert compiled._capture_note(0, 0).startswith('; CUDA graphs: none traced for it')     # dynamo reused an earlier graph
    assert compiled._capture_note(3, 0) == '; CUDA graphs: 3 traced, all captured'


def test_cudagraphs_outputs_are_copies_that_keep_their_gradient():
    weight = torch.randn(3, requires_grad=True)
    produced = []

    def fn(x):
        produced.append(x * weight)
        return dict(y=produced[-1], n=3)

    out = compiled._as_we_call(fn, 'cudagraphs')(torch.ones(3))
    assert out['n'] == 3 and out['y'].data_ptr() != produced[0].data_ptr()
    torch.testing.assert_close(out['y'], produced[0])
    out['y'].sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(3))


def test_own_gradients_replaces_each_grad_by_an_equal_copy():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2))]
    params[0].grad, params[1].grad = torch.randn(4, 3), torch.randn(5)
    before = [p.grad for p in params]
    compiled.own_gradients(params)
    for p, old in zip(params[:2], before):
        assert p.grad is not old and p.grad.data_ptr() != old.data_ptr()
        torch.testing.assert_close(p.grad, old, rtol=0, atol=0)
    assert params[2].grad is None


def test_training_loop_through_cudagraphs_trains_as_eager_over_two_rounds(tmp_path, monkeypatch):
    """training_loop(compile='all', compile_backend='cudagraphs') with two rounds per phase (batch 2, 1 per
    round): the same parameters after 4 steps as an eager run; after every backward the phase's network's
    gradients are taken over from the graphs' memory (so that the next pass adds to them, not to memory a
    replay rewrote): G's after G main and density regularization, D's after D main's fakes, its reals, and R1."""
    data = th.make_dataset(str(tmp_path / 'data'), count=8, resolution=32)
    eager = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'eager'), data, total_kimg=0.008, batch_gpu=1))
    owned = []
    real_own = compiled.own_gradients
    monkeypatch.setattr(compiled, 'own_gradients', lambda params: (owned.append(len(params)), real_own(params)))
    lines = []
    monkeypatch.setattr('builtins.print', lambda *a, **k: lines.append(' '.join(str(x) for x in a)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fast = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'fast'), data, total_kimg=0.008, batch_gpu=1,
                                                 compile='all', compile_backend='cudagraphs'))
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith('torch.compile:')]
    if _TORCH_VERSION == (2, 7):    # G's noise is drawn again in the backward there: see the test above
        assert fallbacks and all('its backward draws random numbers' in f for f in fallbacks), fallbacks
    else:
        assert not fallbacks, fallbacks
        assert any(line.startswith('torch.compile: G.synthesis compiled') for line in lines), lines
        assert any(line.startswith('torch.compile: D compiled') for line in lines), lines
        num_g, num_d = (len(list(fast[name].parameters())) for name in ('G', 'D'))
        # 4 steps x 2 rounds: G main once, density reg every 2nd step once; D main twice (fakes, reals), R1 every 2nd step once.
        assert sorted(n for n in owned if n) == sorted([num_g] * (8 + 4) + [num_d] * (16 + 4)), owned      # (0: the other network)
        assert any(line.startswith('torch.compile: G.sample_mixed compiled') for line in lines), lines
    for name in ('G', 'D', 'G_ema'):
        a, b = fast[name].state_dict(), eager[name].state_dict()
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f'{name}.{k}')


@pytest.mark.gpu
def test_cudagraphs_backend_on_a_gpu_accumulates_and_keeps_outputs():
    """On CUDA (graphs captured and replayed): gradients summed over two forward + backward passes with
    own_gradients in between equal eager's, and an output stays readable after the next call."""
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(8, 1, 1)).cuda()
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(8, 1, 1)).cuda()
    module.load_state_dict(eager.state_dict())
    lines = []
    fast = compiled.Compiled(module, module, 'toy', backend='cudagraphs', log=lines.append)
    xs = [torch.randn(2, 3, 16, 16, device='cuda') for _ in range(2)]
    for step in range(3):           # the checked first call, then replays
        module.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        outs = []
        for x in xs:
            out = fast(x)
            out.square().sum().backward()
            compiled.own_gradients(module.parameters())
            outs.append(out.detach())
            eager(x).square().sum().backward()
        for out, x in zip(outs, xs):
            torch.testing.assert_close(out, eager(x).detach(), rtol=1e-5, atol=1e-5)
        for p, q in zip(module.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    assert fast.failed is None
    assert len(lines) == 1 and lines[0].endswith('traced, all captured'), lines


def phase_gradients(loss, phases, inputs, seed):
    """Gradients of every parameter after each phase, from a fixed seed."""
    real, c, v = inputs
    grads = {}
    torch.manual_seed(seed)
    for phase in phases:
        phase.module.zero_grad(set_to_none=True)
        phase.module.requires_grad_(True)
        z = torch.randn([len(real), loss.G.z_dim])
        loss.accumulate_gradients(phase.name, real, c, v, z, c, v, gain=1, cur_nimg=0)
        phase.module.requires_grad_(False)
        grads[phase.name] = [p.grad.clone() if p.grad is not None else None for p in phase.module.parameters()]
    return grads


class Filtered(torch.nn.Module):
    """A weight times a constant buffer that the product saves for its backward, as the CUDA
    upfirdn2d op saves a FIR filter buffer."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))
        self.register_buffer('fir', torch.randn(4, 4))

    def forward(self, x):
        return (x * self.weight) * self.fir


def test_another_batch_size_gets_a_graph_of_its_own():
    """With dynamo's automatic dynamic shapes, the second batch size traced the batch as a symbol, and
    torch.rand(size, generator=None) (the renderer's stratified samples) cannot take one: the call fell
    back to eager. Each shape is checked on its own anyway: graphs are static."""
    class Jitter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale + torch.rand(x.shape, generator=None, device=x.device)

    module = Jitter()
    fast = compiled.Compiled(module, module, 'jitter', backend='aot_eager', log=lambda line: None)
    with warnings.catch_warnings():
        _fallback_is_an_error()
        for batch in (1, 2, 3):
            torch.manual_seed(batch)
            got = fast(torch.ones(batch, 3))
            torch.manual_seed(batch)
            torch.testing.assert_close(got, module(torch.ones(batch, 3)))
    assert fast.failed is None and len(fast.checked) == 3


@pytest.mark.skipif(not any(hasattr(torch._dynamo.config, flag) for flag in ('fail_on_recompile_limit_hit', 'fail_on_cache_limit_hit')),
                    reason='this torch (before 2.6) cannot raise at the limit: past it dynamo runs eagerly unannounced')
def test_a_shape_past_dynamos_recompile_limit_falls_back_with_the_warning():
    """Past the limit dynamo would run the new shape eagerly without a word, under a line saying it compiled."""
    module = torch.nn.Linear(3, 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled, 'RECOMPILE_LIMIT', 2)
        fast = compiled.Compiled(module, module, 'linear', backend='aot_eager', log=lambda line: None)
        for batch in (1, 2):
            fast(torch.randn(batch, 3))
        with pytest.warns(RuntimeWarning, match='linear failed to compile .*FailOnRecompileLimitHit'):
            out = fast(torch.randn(3, 3))
    assert fast.failed is not None and out.shape == (3, 2)


def test_frames_shared_after_a_graph_break_take_many_signatures():
    """A graph break inside G (the planes, the renderer) starts frames that the synthesis and the density
    query share, each signature of either adding graphs there: in a small128 run of vs_original.py
    (G main, D main, density regularization, inference) a frame passed dynamo's default limit of 8
    graphs, and G's synthesis fell back to eager at inference. Here 10 shapes pass one such frame."""
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def inner(self, x):
            torch._dynamo.graph_break()
            return self.linear(x).tanh()

        def first(self, x):
            return self.inner(x * 2)

        def second(self, x):
            return self.inner(x + 1)

    module = Shared()
    fast = [compiled.Compiled(f, module, name, backend='aot_eager', log=lambda line: None)
            for f, name in ((module.first, 'first'), (module.second, 'second'))]
    with warnings.catch_warnings():
        _fallback_is_an_error()
        for batch in range(1, 6):       # 10 shapes through the frame after the break
            for f, g, rows in zip(fast, (module.first, module.second), (batch, batch + 5)):
                torch.testing.assert_close(f(torch.ones(rows, 3)), g(torch.ones(rows, 3)))
    assert all(f.failed is None for f in fast)


def test_aot_eager_keeps_a_random_draw_whose_result_is_unused(monkeypatch):
    """Without inductor's fallback_random (as in a process that made no inductor Compiled) aot_eager dropped
    an unused draw: the compiled call drew fewer numbers than eager and failed its check."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, 'fallback_random', False)

    class Draws(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            torch.rand(5)                       # unused, but it moves the generator
            return x * self.scale + torch.rand(x.shape)

    module = Draws()
    fast = compiled.Compiled(module, module, 'draws', backend='aot_eager', log=lambda line: None)
    # Older aot_eager drops the draw whatever the flag, and the check must catch it: seen with
    # torch 2.4.1, 2.5.1 and 2.6.0; 2.7.1, 2.8.0, 2.9.1, 2.11.0 and 2.13.0 keep it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.manual_seed(3)
        got = fast(torch.ones(2, 3))
    fell_back = any('draws failed its check against eager' in str(w.message) for w in caught)
    if _TORCH_VERSION <= (2, 6):
        assert fell_back
    if _TORCH_VERSION >= (2, 7):
        assert not fell_back, [str(w.message) for w in caught]
    assert (fast.failed is not None) == fell_back
    torch.manual_seed(3)
    torch.testing.assert_close(got, module(torch.ones(2, 3)))
    with warnings.catch_warnings():
        _fallback_is_an_error()
        torch.manual_seed(3)
        got = fast(torch.ones(2, 3))
        torch.manual_seed(3)
        torch.testing.assert_close(got, module(torch.ones(2, 3)))


def test_the_check_leaves_constant_buffers_that_graphs_saved_intact():
    """The check replays eager from the buffers' starting values. Writing them back when they had not
    changed bumped their version, so the compiled graph, and a caller's graph, that had saved one for
    the backward could not run it (on an H200 both D and G.synthesis fell back to eager this way)."""
    torch.manual_seed(0)
    module = Filtered()
    fast = compiled.Compiled(module, module, 'filtered', backend='aot_eager', log=lambda line: None)
    x = torch.randn(4, 4, requires_grad=True)
    before = x * module.fir                 # the caller's graph has saved the buffer too
    with warnings.catch_warnings():
        _fallback_is_an_error()
        y = fast(x)
        (y.sum() + before.sum()).backward()
    assert fast.failed is None and len(fast.checked) == 1
    torch.testing.assert_close(x.grad, module.weight.detach() * module.fir + module.fir)
    torch.testing.assert_close(module.weight.grad, x.detach() * module.fir)


@pytest.mark.parametrize('ops', ['reference', 'kernels'])
def test_next3d_training_phases_with_a_compiled_D_give_eager_gradients(ops, request):
    """tiny64: G main, density reg, D main with the compiled D; R1 with the eager D (double backward).
    ops: the CPU reference ops, or the custom ops of the GPU path (their CPU twins).

    (Tracing the Next3D synthesis takes minutes even with aot_eager; the loop test below compiles a toy G.)
    """
    if ops == 'kernels':
        request.getfixturevalue('pretend_kernels')
    cfg = 'tiny64'
    from benchmarks.train_step import make_inputs
    template = configs.default_template(cfg)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        G = configs.make_generator(cfg, template_obj=template).train().requires_grad_(False)
        D = configs.make_discriminator(cfg).train().requires_grad_(False)
        nets.append((G, D))
    inputs = make_inputs(nets[0][0], 2, template, 'cpu')
    results, lines = [], []
    for i, (G, D) in enumerate(nets):
        loss = Next3DLoss('cpu', G, D, r1_gamma=1.0, blur_init_sigma=1, blur_fade_kimg=1, neural_rendering_resolution_initial=G.neural_rendering_resolution)
        if i == 1:
            loss.compile_networks('D', backend='aot_eager', log=lines.append)
            assert isinstance(loss.D_forward, compiled.Compiled) and not isinstance(loss.synthesis_forward, compiled.Compiled)
        adam = dict(lr=0.002, betas=[0, 0.99], eps=1e-8)
        phases = setup_phases(G, D, adam, adam, 4, 16)
        results.append(phase_gradients(loss, phases, inputs, seed=5))
    assert sorted(results[0]) == ['Dmain', 'Dreg', 'Gmain', 'Greg']
    for name in results[0]:
        for want, got in zip(results[0][name], results[1][name]):
            assert (want is None) == (got is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * (1 + want.abs().max().item()), msg=name)
    assert loss.D_forward.failed is None and len(loss.D_forward.checked) == 3      # G main (D frozen), D main's fakes and reals
    assert any(line.startswith('torch.compile: D compiled') for line in lines)


def test_training_loop_with_compile_trains_as_eager(tmp_path, monkeypatch):
    """training_loop(compile='all'): the same parameters after 4 steps (all four phases) as an eager run."""
    monkeypatch.setattr(compiled, 'DEFAULT_BACKEND', 'aot_eager')      # inductor's C++ builds take minutes
    data = th.make_dataset(str(tmp_path / 'data'), count=8, resolution=32)
    eager = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'eager'), data, total_kimg=0.008))
    lines = []
    monkeypatch.setattr('builtins.print', lambda *a, **k: lines.append(' '.join(str(x) for x in a)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fast = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'fast'), data, total_kimg=0.008, compile='all'))
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith('torch.compile:')]
    assert not fallbacks, fallbacks                 # every signature ran compiled: none fell back to eager
    assert any(line.startswith('torch.compile: D compiled') for line in lines), lines
    assert any(line.startswith('torch.compile: G.synthesis compiled') for line in lines), lines
    assert any(line.startswith('torch.compile: G.sample_mixed compiled') for line in lines), lines      # density regularization
    for name in ('G', 'D', 'G_ema'):
        a, b = fast[name].state_dict(), eager[name].state_dict()
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f'{name}.{k}')


def test_bias_act_after_a_matrix_product_compiles_to_the_eager_values():
    """Inductor rewrote bias_act's add(b * gain, x, alpha=gain) of a matmul output as an addmm without the alpha
    (pytorch/pytorch#167313): a fully connected layer's output was off by up to 5.6 here; the self-check refused D."""
    from torch_utils.ops import bias_act
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 32), torch.randn(32, 32), torch.randn(32)
    for act in ('linear', 'lrelu'):
        torch.compiler.reset()
        f = lambda x: bias_act.bias_act(x.matmul(w.t()), b, dim=1, act=act, gain=1.5)
        torch.testing.assert_close(torch.compile(f, backend='inductor')(x), f(x), rtol=1e-5, atol=1e-5)


def test_the_texture_fill_compiles_with_inductor():
    """Inductor (torch 2.13, CPU) generated C++ that does not build for the pointer-doubling boolean steps of
    fill_enclosed (a vectorised & of masks), which kept the whole Next3D synthesis from compiling; they run eagerly."""
    from training.mesh import texture_planes
    torch.manual_seed(0)
    alpha = (torch.rand(2, 1, 64, 64) > 0.3).float().requires_grad_(True)
    f = lambda a: texture_planes.fill_enclosed(a) * 2
    torch.testing.assert_close(torch.compile(f, backend='inductor')(alpha), f(alpha))


def test_rasterization_does_not_recompile_for_every_mesh():
    """The visible-face search sizes its candidate lists by the mesh (data-dependent), so dynamo recompiled the
    synthesis's rasterization for every new mesh until its recompile limit (8), each graph unchecked against eager.
    That search and the enclosed-hole fill run eagerly; the compiled graph around them depends on the shapes only."""
    import torch._dynamo
    from training.mesh import texture_planes
    from training.mesh.rasterize import rasterize
    gen = torch.Generator().manual_seed(0)
    faces = torch.randint(0, 40, (60, 3), generator=gen)

    def f(verts):
        frag = rasterize(verts * 1.0, faces, 24, cull_backfaces=False)
        alpha = (frag.pix_to_face >= 0).float()[:, None]
        return frag.bary.sum(-1) * 2 + texture_planes.fill_enclosed(alpha)[:, 0]

    torch.compiler.reset()
    compiled_f = torch.compile(f, backend='aot_eager')
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scale in (0.5, 0.9, 0.2):         # a different number of covered pixels and candidates each time
            verts = torch.rand(2, 40, 3, generator=gen) * 2 - 1
            verts[..., :2] *= scale
            torch.testing.assert_close(compiled_f(verts), f(verts))


def _traced_graphs(fn, *args) -> tuple:
    """How dynamo traces fn(*args) (without compiling it): (number of graphs, reasons of its breaks).
    A frame dynamo gives up on runs eagerly and counts no graph."""
    import torch._dynamo
    torch.compiler.reset()
    explained = torch._dynamo.explain(fn)(*args)
    torch.compiler.reset()
    return explained.graph_count, [b.reason.splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize('channels_last', [False, True])
def test_the_next3d_plane_blend_traces_without_a_graph_break_and_blends_as_eager(channels_last):
    """Without a graph to record, eager mode blends plane by plane into the static planes through
    a strided out=, which dynamo cannot trace (alone, it traces no graph of the blend at all):
    under torch.compile that split Next3D's synthesis
    (on the generic path a GPU takes, traced on the meta device, a tiny64 synthesis given its
    geometry made 11 graphs without a gradient, 1 after this and the importance sampler's fix:
    each split a boundary between CUDA graphs for --compile-backend=cudagraphs)."""
    from training.next3d_generator import blend_planes
    torch.manual_seed(0)
    static = torch.randn(2, 3, 4, 8, 8)
    if channels_last:           # the channels innermost, as channels-last convolutions make them
        static = static.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    rendered = tuple(torch.randn(2, 4, 8, 8) for _ in range(3))
    alpha = tuple(torch.rand(2, 1, 8, 8) for _ in range(3))
    want = torch.stack(rendered, 1) * torch.stack(alpha, 1) + static * (1 - torch.stack(alpha, 1))
    with torch.no_grad():
        assert _traced_graphs(blend_planes, static.clone(), rendered, alpha) == (1, [])
        compiled_out = torch.compile(blend_planes, backend='aot_eager')(static.clone(), rendered, alpha)
        eager_out = blend_planes(static.clone(), rendered, alpha)
    torch.compiler.reset()
    torch.testing.assert_close(eager_out, want)
    assert torch.equal(compiled_out, eager_out)


def test_the_importance_sampler_traces_without_a_graph_break():
    """Its max-pool as an elementwise maximum wrote into a strided out= (a graph break under
    torch.compile, between the coarse and the fine pass of every render); now slice
    assignments, the same values (the sampler's own tests)."""
    from training.volumetric_rendering.renderer import sample_importance
    torch.manual_seed(0)
    depths = torch.sort(torch.rand(2, 16, 12, 1) * 2 + 1, dim=2).values
    weights = torch.rand(2, 16, 11, 1)
    assert _traced_graphs(lambda d, w: sample_importance(d, w, 6, deterministic=True), depths, weights) == (1, [])
