"""torch.compile as an option, checked against eager, with a fallback that works.

`Compiled(fn, module, name)` is called like `fn` (a module or a method of one) and runs
`torch.compile(fn)`. The first call with each new signature (the tensors' shapes, strides,
dtypes, devices and requires_grad, the other arguments, grad mode, training mode, which
parameters require grad) is a self-check: the compiled call is timed (that time, mostly compiling, is
logged), then the same call runs in eager mode from the same RNG state and buffers, and
the outputs, the buffers written, where the CPU generator ends and, when the output needs a
gradient, the gradients of a fixed random projection of the output with respect to every
parameter and input that requires grad (and where the CPU generator ends after them) are
compared. An exception on that first call (no C++ compiler, no triton,
a compiler bug) or a mismatch warns once and the eager module is used from then on; so
does a compiler error on a later call.

Shapes are static (dynamic=False): each new shape is a new signature, traced and checked on
its own. (With dynamo's automatic dynamic shapes a second batch size was traced as a symbol,
which torch.rand(size, generator=None) cannot take: the call fell back to eager.) A shape
past the recompile limit (RECOMPILE_LIMIT) raises instead of running eagerly unannounced, so
it falls back to eager with the warning.

Random numbers: the graphs draw them with eager's generator, in eager's order
(`torch._inductor.config.fallback_random`, which also keeps draws whose result is unused), so
a compiled run draws the same numbers as an eager one and the check can compare outputs of
random ops. Not for 'cudagraphs' (see below).

Gradients and rounding: a compiled graph sums in another order than eager, and a gradient
that is a small sum of large terms (a noise strength's: noise x the incoming gradient over a
whole feature map) then differs by far more than the tolerance in relative terms, while the
rest match to 1e-5. So a gradient that misses the tolerance is judged against how much eager's
own gradient moves when every weight and input moves by NUDGE (relative, random signs; a
training step moves the weights by ~1e-3): the compiled gradient passes if it is within
NUDGE_FACTOR times that of eager's. Next3D's gradients are not smooth at that scale (pixel
coverage, importance samples, leaky ReLU branches): one nudge moved a noise strength's
gradient by 8% and another by several times that, so up to NUDGES nudges, each with other
signs, are tried for a gradient that misses, and the largest change counts. The price: a
gradient that eager itself moves by 10% or more under a nudge is in effect not checked
(even zeros would pass there); the log names the tensor with the largest error.

Double backward (R1's gradient penalty) does not go through compiled graphs: callers use
the eager module there.

Backend 'cudagraphs': dynamo's graphs replayed as CUDA graphs (cudagraph trees) with eager
kernels, no Triton: what it cuts is the host's work per kernel launch, which bounds our
small-batch step on a GPU, and its warm-up is the tracing alone (no code generation). On a
CPU it runs the traced graphs with eager kernels (no capture). With this backend (a CUDA
graph writes its outputs into memory of its own, which its next run overwrites):
  - the first call per signature runs RECORD_RUNS times from the same state before the
    checked one (cudagraph trees warm up, then record), so that the call compared with
    eager is a replay;
  - the outputs returned are copies;
  - its graphs are traced with fallback_random off: with it on, each backward of these
    graphs drew the forward's random numbers again (the calls after it then drew other
    numbers than eager). Off, a draw whose result is unused is dropped from the graph, and
    the check then refuses the network (no network of ours has one): always for a draw on
    the CPU generator, on a GPU only where a later draw's output shows it (CUDA generators
    are not compared, see _compare);
  - the gradients its backward leaves in the parameters' .grad live in graph memory too
    (AccumulateGrad keeps the tensor it is given): callers take them over with
    own_gradients() after each backward, or the next run would overwrite gradients still
    to be summed (D's over the fakes' and the reals' passes, any network's over the rounds
    of a batch).
"""

import time
import warnings

import torch
import torch.utils._pytree as pytree

from torch_utils import misc

BACKENDS = ('inductor', 'aot_eager', 'cudagraphs')    # the torch.compile backends we accept
DEFAULT_BACKEND = 'inductor'
FORWARD_TOL = 1e-3                          # |compiled - eager| <= tol x (1 + |eager|) on every output element
GRADIENT_TOL = 1e-3                         # ||g_compiled - g_eager|| <= tol x ||g_eager|| for every gradient, or
NUDGE, NUDGE_FACTOR = 1e-5, 10              # <= factor x ||g_eager(weights, inputs x (1 +- NUDGE)) - g_eager||
NUDGES = 3                                  # nudges tried at most (other random signs each), the largest change counts
RECORD_RUNS = 2                             # 'cudagraphs': runs before the checked one (warm-up, recording)
# Dynamo's recompile limit (its default: 8) counts the graphs of each frame, and the frames that
# a graph break starts inside G (the planes, the renderer) serve the synthesis and the density
# query in every grad mode, training mode and shape: small128's 3 + 1 signatures passed 8.
RECOMPILE_LIMIT = 64


def _describe(x):
    """A hashable description of one argument leaf for the signature (strides too: dynamo recompiles on them)."""
    if isinstance(x, torch.Tensor):
        return ('tensor', tuple(x.shape), x.stride(), x.dtype, str(x.device), x.requires_grad)
    try:
        hash(x)
        return ('value', type(x).__name__, x)
    except TypeError:
        return ('value', type(x).__name__, repr(x))


def _gradient_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| over the whole tensor: the few elements where a last-bit difference flips an lrelu's branch weigh little."""
    got, ref = got.double(), ref.double()
    if got.shape != ref.shape:
        return float('inf')
    if ref.numel() == 0:
        return 0.0
    return ((got - ref).norm() / ref.norm().clamp(min=1e-12)).item()


class CompileCheckFailed(RuntimeError):
    """The compiled module disagrees with the eager one."""


class Compiled:
    """`fn` through torch.compile, self-checked per signature, falling back to eager.

    fn:      what to compile: a torch.nn.Module or a bound method of one (G.synthesis); the
             eager fallback and the reference of the check.
    module:  the torch.nn.Module whose parameters and buffers `fn` uses.
    name:    what the log and the warning call it ('D', 'G.synthesis').
    backend: one of BACKENDS (None: DEFAULT_BACKEND).
    log:     callable for the compile-time lines (print; a no-op on other ranks).
    """

    def __init__(self, fn, module: torch.nn.Module, name: str, backend: str = None, log=print):
        backend = backend or DEFAULT_BACKEND
        if backend not in BACKENDS:
            raise ValueError(f'torch.compile backend {backend!r} is not one we use (expected {" or ".join(BACKENDS)})')
        import torch._inductor.config
        if backend != 'cudagraphs':
            torch._inductor.config.fallback_random = True   # eager's generator for rand/randn/dropout
        self.fn, self.module, self.name, self.log, self.backend = fn, module, name, log, backend
        # module.parameters() walks every submodule: ~0.27 ms for G's 352 tensors, each call.
        self.params = list(module.parameters())
        self.graphs_traced = 0                  # graphs dynamo handed the backend (counted for 'cudagraphs')
        # A graph per shape (dynamic=False), as each is checked.
        self.compiled = _as_we_call(torch.compile(fn, backend=self._counting_cudagraphs if backend == 'cudagraphs' else backend,
                                                  dynamic=False), backend)
        self.checked = set()                    # signatures whose check passed
        self.failed = None                      # the reason the eager module is used, or None
        self.compile_seconds = 0.0              # wall time of the checked first calls, summed

    def _counting_cudagraphs(self, graph_module, example_inputs):
        """torch's 'cudagraphs' backend, counting the graphs it is given."""
        from torch._dynamo.backends.registry import lookup_backend
        self.graphs_traced += 1
        return lookup_backend('cudagraphs')(graph_module, example_inputs)

    def _signature(self, args, kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        params = tuple(p.requires_grad for p in self.params)
        return (str(spec), tuple(_describe(x) for x in leaves), torch.is_grad_enabled(), self.module.training, params)

    def _fall_back(self, why: str):
        self.failed = why
        warnings.warn(f'torch.compile: {self.name} {why}; running it eagerly from now on.', RuntimeWarning, stacklevel=3)

    def __call__(self, *args, **kwargs):
        if self.failed is not None:
            return self.fn(*args, **kwargs)
        key = self._signature(args, kwargs)
        if key in self.checked:
            try:
                return self.compiled(*args, **kwargs)
            except _compiler_errors() as e:
                self._fall_back(f'failed to compile ({type(e).__name__}: {_first_line(e)})')
                return self.fn(*args, **kwargs)
        return self._checked_call(key, args, kwargs)

    def _checked_call(self, key, args, kwargs):
        """First call with a new signature: compiled, then eager from the same state, compared; then the call itself.

        The check's gradients consume both graphs (a compiled backward with donated buffers
        cannot keep its graph), so the call that is returned runs again from the same state.
        """
        rng = _rng_state()
        buffers = [b.detach().clone() for b in self.module.buffers()]
        # The check differentiates with respect to inputs cut from the caller's graph, which it must leave intact.
        check_args, check_kwargs = pytree.tree_map_only(torch.Tensor, lambda x: x.detach().requires_grad_(x.requires_grad), (args, kwargs))

        def from_start(fn, args=args, kwargs=kwargs):
            _set_rng_state(rng)
            _set_buffers(self.module, buffers)
            return fn(*args, **kwargs)

        start, skips, traced = time.time(), _cudagraph_skips(), self.graphs_traced
        try:
            for _ in range(RECORD_RUNS if self.backend == 'cudagraphs' else 0):     # so that the call checked is a replay
                _exercise(from_start(self.compiled, check_args, check_kwargs), self.module, (check_args, check_kwargs))
            out = from_start(self.compiled, check_args, check_kwargs)
        except Exception as e:      # a compiler that cannot run here must not stop training
            self._fall_back(f'failed to compile ({type(e).__name__}: {_first_line(e)})')
            return from_start(self.fn)
        seconds = time.time() - start
        buffers_after = [b.detach().clone() for b in self.module.buffers()]
        generator_after = torch.get_rng_state()
        ref = from_start(self.fn, check_args, check_kwargs)
        generators_after = (generator_after, torch.get_rng_state())

        def eager_nudged(projections, attempt):
            """Gradients (parameters, then inputs) of eager from the same state with the floating
            parameters and inputs x (1 +- NUDGE), random signs (other ones for each attempt)."""
            gen = nudge_generator(attempt)
            def nudged(x):
                signs = torch.randint(0, 2, x.shape, generator=gen).to(x.device, x.dtype) * 2 - 1
                return x.detach() * (1 + NUDGE * signs)
            nudge = lambda x: nudged(x).requires_grad_(x.requires_grad) if x.is_floating_point() else x
            inputs = pytree.tree_map_only(torch.Tensor, nudge, (check_args, check_kwargs))
            # The weights are swapped (.data), never written: a caller's graph may have saved them.
            params = [p for p in self.module.parameters() if p.is_floating_point()]
            originals = [p.data for p in params]
            try:
                for p in params:
                    p.data = nudged(p)
                outputs = from_start(self.fn, *inputs)
                differentiable = [o for o in _grad_tensors(outputs) if o.is_floating_point()]
                return _gradients(differentiable, projections, [p for p in self.module.parameters() if p.requires_grad] + _grad_tensors(inputs))
            finally:
                for p, original in zip(params, originals):
                    p.data = original

        try:
            errors = self._compare(out, ref, buffers_after, generators_after, check_args, check_kwargs, eager_nudged)
        except Exception as e:      # includes a backward the compiler cannot build
            self._fall_back(f'failed its check against eager ({type(e).__name__}: {_first_line(e)})')
            return from_start(self.fn)
        self.checked.add(key)
        self.compile_seconds += seconds
        forward_error, gradient_error, where = errors
        rounding = (f' at {where}, within {NUDGE_FACTOR}x the largest change of eager\'s for weights and inputs x (1 +- {NUDGE:g})'
                    if gradient_error > GRADIENT_TOL else '')
        capture = ''
        if self.backend == 'cudagraphs':        # a graph cudagraph trees skip runs without capture, correct but slow
            capture = _capture_note(self.graphs_traced - traced, _cudagraph_skips() - skips)
        self.log(f'torch.compile: {self.name} compiled for a new input signature in {seconds:.1f} s '
                 f'(matches eager: output error {forward_error:.1e}, gradient error {gradient_error:.1e}{rounding}){capture}')
        try:
            return from_start(self.compiled)
        except _compiler_errors() as e:
            self._fall_back(f'failed to compile ({type(e).__name__}: {_first_line(e)})')
            return from_start(self.fn)

    def _compare(self, out, ref, buffers_after, generators_after, args, kwargs, eager_nudged):
        """(output error, gradient error, the name of the parameter or input it is at); raises
        CompileCheckFailed on a mismatch.

        generators_after: the CPU generator's state after the compiled and after the eager
        forward (from the same state): the compiled call must draw as many numbers there, and
        its backward as many as eager's backward. Outputs alone miss a draw whose numbers are
        not used (aot_eager before torch 2.7 drops one; the 'cudagraphs' backend of torch
        2.7.1 runs the forward's draw again in the backward), yet it moves every later
        draw of the run. CUDA generators are not compared: a CUDA graph advances theirs by
        its own bookkeeping (not tried on a GPU), so on a GPU neither case is seen here.
        (A custom autograd.Function that draws in its backward is refused: the compiled
        graphs draw that number in the forward.)

        eager_nudged(projections, attempt) -> the gradients of eager with the weights and inputs
        x (1 +- NUDGE), signs drawn by nudge_generator(attempt); called only when a gradient
        misses GRADIENT_TOL, up to NUDGES times while one still misses.
        """
        outs, out_spec = pytree.tree_flatten(out)
        refs, ref_spec = pytree.tree_flatten(ref)
        if str(out_spec) != str(ref_spec):
            raise CompileCheckFailed(f'output structure {out_spec}, expected {ref_spec}')
        pairs = [(o, r) for o, r in zip(outs, refs) if isinstance(r, torch.Tensor)]
        forward_error = max([misc.relative_error(o, r) for o, r in pairs] +
                            [misc.relative_error(b, r) for b, r in zip(buffers_after, self.module.buffers())], default=0.0)
        if not forward_error <= FORWARD_TOL:
            raise CompileCheckFailed(f'output error {forward_error:.3g} > {FORWARD_TOL:g}')
        if not torch.equal(*generators_after):
            raise CompileCheckFailed('its forward draws other random numbers than eager\'s (the CPU generator ends elsewhere)')
        gradient_error, where = 0.0, None
        differentiable = [(o, r) for o, r in pairs if r.requires_grad and r.is_floating_point()]
        if differentiable:
            named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
            params = [p for _, p in named]
            leaves = params + _grad_tensors((args, kwargs))
            names = [n for n, _ in named] + [f'input {i}' for i in range(len(leaves) - len(params))]
            gen = torch.Generator(device=differentiable[0][1].device).manual_seed(0)
            projections = [torch.randn(r.shape, generator=gen, device=r.device, dtype=r.dtype) for _, r in differentiable]
            generator = torch.get_rng_state()
            got = _gradients([o for o, _ in differentiable], projections, leaves)
            generator_after = torch.get_rng_state()
            torch.set_rng_state(generator)
            want = _gradients([r for _, r in differentiable], projections, leaves)
            if not torch.equal(generator_after, torch.get_rng_state()):
                raise CompileCheckFailed('its backward draws random numbers that eager\'s does not (the CPU generator moves)')
            errors = [_gradient_error(g, w) for g, w in zip(got, want)]
            gradient_error, where = max(zip(errors, names), default=(0.0, None))
            floors = [0.0] * len(errors)        # the largest change of eager's gradient over the nudges so far
            for attempt in range(NUDGES + 1):
                missed = [i for i, error in enumerate(errors) if not (error <= GRADIENT_TOL or error <= NUDGE_FACTOR * floors[i])]
                if not missed or attempt == NUDGES:
                    break
                floors = [max(floor, _gradient_error(g, w)) for floor, g, w in zip(floors, eager_nudged(projections, attempt), want)]
            if missed:
                i = missed[0]
                raise CompileCheckFailed(f'gradient error {errors[i]:.3g} at {names[i]} > {GRADIENT_TOL:g} and > {NUDGE_FACTOR} x '
                                         f'{floors[i]:.3g} (the largest change of eager\'s in {NUDGES} nudges of its weights and '
                                         f'inputs x (1 +- {NUDGE:g}))')
        return forward_error, gradient_error, where


def _cudagraph_skips() -> int:
    """How many traced graphs cudagraph trees have skipped (ran without capture) in this process."""
    from torch._dynamo.utils import counters
    return counters['inductor']['cudagraph_skips']


def _capture_note(traced: int, skipped: int) -> str:
    """What the compile line says of CUDA graph capture, given the graphs dynamo traced for the
    call and the graphs (forward or backward) cudagraph trees skipped meanwhile."""
    if traced == 0:
        return '; CUDA graphs: none traced for it (graphs traced for an earlier signature serve it)'
    if skipped:
        return f'; CUDA graphs: {traced} traced, {skipped} (forward or backward) not captured (torch\'s log says why)'
    return f'; CUDA graphs: {traced} traced, all captured'


def _as_we_call(fn, backend: str):
    """A torch.compile'd fn as Compiled calls it: dynamo's recompile limit raised to
    RECOMPILE_LIMIT and raising there (by default dynamo runs a frame past its limit eagerly
    from then on without a word, under a line that says it is compiled; a torch older than 2.6
    cannot raise there and keeps that behaviour). For 'cudagraphs', traced with inductor's
    fallback_random off and its tensor outputs copied (differentiably) out of a CUDA graph's
    memory (see the module's docstring)."""
    import torch._dynamo.config
    import torch._inductor.config
    # The limit and the flag that raises there, under their old names where this torch lacks
    # the new ones (torch 2.6 has them only as cache_size_limit and fail_on_cache_limit_hit).
    config = torch._dynamo.config
    limits = {'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit': RECOMPILE_LIMIT}
    fail_flag = next((flag for flag in ('fail_on_recompile_limit_hit', 'fail_on_cache_limit_hit') if hasattr(config, flag)), None)
    if fail_flag is not None:
        limits[fail_flag] = True
    cuda_graphs = backend == 'cudagraphs'
    inductor = dict(fallback_random=False) if cuda_graphs else {}

    def call(*args, **kwargs):
        with torch._dynamo.config.patch(**limits), torch._inductor.config.patch(**inductor):
            out = fn(*args, **kwargs)
        return pytree.tree_map_only(torch.Tensor, torch.clone, out) if cuda_graphs else out
    return call


def _exercise(outputs, module: torch.nn.Module, inputs):
    """Run the backward of sum(outputs) to every parameter and input that requires grad (as a
    training step would), if any output requires grad; the gradients are dropped."""
    differentiable = [o for o in _grad_tensors(outputs) if o.is_floating_point()]
    leaves = [p for p in module.parameters() if p.requires_grad] + _grad_tensors(inputs)
    if differentiable and leaves:
        _gradients(differentiable, [torch.ones_like(o) for o in differentiable], leaves)


def own_gradients(params) -> None:
    """Replace each parameter's .grad by a copy (one multi-tensor op): after the backward of a
    call through the 'cudagraphs' backend, .grad may be memory of a CUDA graph that its next
    run overwrites."""
    params = [p for p in params if p.grad is not None]
    if params:
        for p, grad in zip(params, torch._foreach_mul([p.grad for p in params], 1.0)):
            p.grad = grad


def nudge_generator(attempt: int) -> torch.Generator:
    """The CPU generator that draws the signs of nudge number `attempt` (0, 1, ...): the
    floating inputs' first, in pytree order, then the floating parameters'."""
    return torch.Generator().manual_seed(1 + attempt)


def _grad_tensors(tree) -> list:
    """The tensors in a pytree that require grad, in pytree order."""
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor) and x.requires_grad]


def _gradients(outputs, projections, leaves):
    """d sum(outputs x projections) / d leaves (zeros where unused); frees the graph."""
    total = sum((o * p).sum() for o, p in zip(outputs, projections))
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _compiler_errors() -> tuple:
    """The exception types of dynamo and inductor (InductorError is newer than torch 2.4)."""
    import torch._dynamo.exc
    import torch._inductor.exc
    return tuple(t for t in (torch._dynamo.exc.TorchDynamoException, getattr(torch._dynamo.exc, 'FailOnRecompileLimitHit', None),
                             getattr(torch._inductor.exc, 'InductorError', None)) if t is not None)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else 'no message'


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)


def _set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _set_buffers(module: torch.nn.Module, values):
    """Write back the buffers that differ from `values`. A constant one (a FIR filter) is left
    alone: a graph may have saved it for its backward, and a write would bump its version.
    (A buffer with NaNs, or one that the forward writes and a graph saves, is still written:
    no network of ours has such a buffer.)"""
    with torch.no_grad():
        for b, v in zip(module.buffers(), values):
            if not torch.equal(b, v):
                b.copy_(v)

