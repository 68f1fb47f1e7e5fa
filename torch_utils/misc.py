"""Shape checks, relative errors, the infinite distributed sampler, parameter copying, module summaries,
constants per device, gradient layout and the host CPU's vendor."""

import contextlib
import functools
import platform
import re

import numpy as np
import torch


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / (1 + |ref|) in float64 (0 for empty tensors, inf for other shapes, NaN passes through)."""
    if got.shape != ref.shape:
        return float('inf')
    if ref.numel() == 0:
        return 0.0
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).abs() / (1 + ref.abs())).max().item()


def assert_shape(tensor: torch.Tensor, ref_shape, name: str = 'tensor'):
    """Raise AssertionError unless `tensor.shape` matches `ref_shape` (None = any size)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'{name}: wrong number of dimensions: got {tensor.ndim} {tuple(tensor.shape)}, expected {len(ref_shape)}')
    for idx, (size, ref) in enumerate(zip(tensor.shape, ref_shape)):
        if ref is None:
            continue
        if isinstance(ref, torch.Tensor):
            ref = int(ref)
        if size != ref:
            raise AssertionError(f'{name}: wrong size for dimension {idx}: got {size} in {tuple(tensor.shape)}, expected {ref}')


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices for one rank.

    Rank r of n takes every n-th index of one shared order, so the ranks see disjoint
    items that together cover the dataset. With `shuffle`, the order is a seeded
    permutation that is locally re-shuffled as it is consumed (window = fraction of the
    dataset), giving a fresh order every epoch without a global barrier.
    """

    def __init__(self, dataset, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0, window_size: float = 0.5):
        if len(dataset) == 0:
            raise ValueError('InfiniteSampler: the dataset is empty')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'InfiniteSampler: rank {rank} is outside [0, {num_replicas})')
        super().__init__()
        self.dataset_size = len(dataset)
        self.rank, self.num_replicas = rank, num_replicas
        self.shuffle, self.seed, self.window_size = shuffle, seed, window_size

    def __iter__(self):
        order = np.arange(self.dataset_size)
        rnd, window = None, 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(order.size * self.window_size))
        idx = 0
        while True:
            i = idx % order.size
            if idx % self.num_replicas == self.rank:
                yield int(order[i])
            if window >= 2:
                j = (i - rnd.randint(window)) % order.size
                order[i], order[j] = order[j], order[i]
            idx += 1


def named_params_and_buffers(module: torch.nn.Module):
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False, rename=None):
    """Copy every parameter and buffer of `dst_module` that `src_module` has with the same name and shape.

    `rename(dst_name) -> src_name` maps names (e.g. to initialise a texture generator from
    a backbone). Returns dict(copied, shape_mismatch, missing) with lists of dst names.
    """
    src = dict(named_params_and_buffers(src_module))
    report = dict(copied=[], shape_mismatch=[], missing=[])
    for name, tensor in named_params_and_buffers(dst_module):
        src_name = rename(name) if rename is not None else name
        if src_name not in src:
            report['missing'].append(name)
        elif src[src_name].shape != tensor.shape:
            report['shape_mismatch'].append(name)
        else:
            tensor.copy_(src[src_name].detach())
            tensor.requires_grad_(tensor.requires_grad)
            report['copied'].append(name)
    if require_all and (report['missing'] or report['shape_mismatch']):
        raise KeyError(f"copy_params_and_buffers: missing {report['missing'][:5]}, shape mismatch {report['shape_mismatch'][:5]}")
    return report


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce for this backward unless `sync` (no-op without DDP)."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    else:
        yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: str = None):
    """Raise if any parameter or buffer differs between ranks (no-op in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for name, tensor in named_params_and_buffers(module):
        if ignore_regex is not None and re.fullmatch(ignore_regex, name):
            continue
        other = tensor.detach().clone()
        torch.distributed.broadcast(other, src=0)
        if not (torch.nan_to_num(tensor.detach()) == torch.nan_to_num(other)).all():
            raise RuntimeError(f'check_ddp_consistency: {type(module).__name__}.{name} differs between ranks')


def print_module_summary(module: torch.nn.Module, inputs, max_nesting: int = 3, skip_redundant: bool = True):
    """Run one forward pass and print a table of submodules: parameters, buffers, output shapes and dtypes.

    Returns the module's outputs.
    """
    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
            if isinstance(outputs, dict):
                outs = list(outputs.values())
            entries.append((mod, [t for t in outs if isinstance(t, torch.Tensor)]))

    hooks = [m.register_forward_pre_hook(pre_hook) for m in module.modules()]
    hooks += [m.register_forward_hook(post_hook) for m in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for h in hooks:
            h.remove()

    seen = set()
    names = {mod: name for name, mod in module.named_modules()}
    rows = [['Module', 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    total_params = total_buffers = 0
    for mod, outs in entries:
        params = [t for t in mod.parameters() if id(t) not in seen]
        buffers = [t for t in mod.buffers() if id(t) not in seen]
        seen.update(id(t) for t in params + buffers)
        if skip_redundant and not params and not buffers and mod is not module and len(list(mod.children())) > 0:
            continue
        n_params, n_buffers = sum(t.numel() for t in params), sum(t.numel() for t in buffers)
        total_params += n_params
        total_buffers += n_buffers
        shapes = [str(list(t.shape)) for t in outs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in outs] or ['-']
        name = names.get(mod, '?') or '<top-level>'
        rows.append([name, str(n_params) if n_params else '-', str(n_buffers) if n_buffers else '-', shapes[0], dtypes[0]])
        for s, d in zip(shapes[1:], dtypes[1:]):
            rows.append(['', '', '', s, d])
    rows += [['---'] * 5, ['Total', str(total_params), str(total_buffers), '', '']]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for row in rows:
        print('  '.join(cell.ljust(w) for cell, w in zip(row, widths)))
    print()
    return outputs


def nan_to_num_grads(params):
    """Replace NaN/inf in gradients by 0 / +-1e5 (in place), as EG3D does after the all-reduce."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def version_key(t: torch.Tensor):
    """(address, version) of t, which changes when t is written in place; None for inference
    tensors (they keep no version counter). For caches of values derived from a tensor."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:
        return None


def dense_stride(x: torch.Tensor) -> tuple:
    """The strides of a dense tensor with x's shape and dimension order (x's own if dense)."""
    return torch.empty_like(x, device='meta').stride()


def copy_with_stride(src: torch.Tensor, stride: tuple) -> torch.Tensor:
    """A copy of src laid out with the given (dense) strides."""
    return torch.empty_strided(src.shape, stride, dtype=src.dtype, device=src.device).copy_(src)


class _GradientInLayout(torch.autograd.Function):
    """Identity whose backward hands the gradient on in the input's memory layout."""

    @staticmethod
    def forward(ctx, x):
        ctx.stride = dense_stride(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad if grad.stride() == ctx.stride else copy_with_stride(grad, ctx.stride)


def keep_gradient_layout(x: torch.Tensor) -> torch.Tensor:
    """x (as a view) whose gradient comes back in x's memory layout, whatever layout the ops
    after it give their gradients (a concatenation or grid_sample's backward: contiguous).

    For a channels-last convolution's output read through other views (the tri-planes): a
    contiguous gradient would reach that convolution's backward in the other layout, 2-3x
    slower in oneDNN on the CPU. One copy where the layouts differ; contiguous x: x itself."""
    if not x.requires_grad or x.is_contiguous():
        return x
    return _GradientInLayout.apply(x)


def records_graph(*tensors) -> bool:
    """Whether autograd records operations on these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=None)
def mkl_vector_math_fast() -> bool:
    """Whether torch's CPU exp and log run at the speed of MKL's vector maths: torch calls MKL
    for them (not for exp2 or log1p), and MKL takes its fast code paths on Intel CPUs only.
    On an Intel Xeon (AVX-512, torch 2.13, one thread) log took 0.26 ns a value, and 1.06 ns
    with MKL held to the generic path it runs elsewhere (MKL_CBWR=COMPATIBLE); torch's own
    log1p 0.74 ns either way. True when this torch has MKL and the CPU's vendor is Intel."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
            return any(line.startswith('vendor_id') and 'GenuineIntel' in line for line in f)
    except OSError:
        return 'GenuineIntel' in platform.processor()         # Windows names the vendor there


def split_keeping_gradient_layout(x: torch.Tensor) -> tuple:
    """x.split(1) (views of its items along dim 0) whose backward writes the items' gradients
    into one gradient in x's memory layout: split's own backward concatenates them
    contiguously, and a channels-last x would then need a second, transposing copy
    (keep_gradient_layout). Items without a gradient get zeros."""
    if not records_graph(x):
        return x.split(1)
    return _SplitInLayout.apply(x)


class _SplitInLayout(torch.autograd.Function):
    """x.split(1); the backward copies the items' gradients into one tensor with x's strides."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.stride = x.shape, dense_stride(x)
        ctx.set_materialize_grads(False)
        return tuple(x.split(1))

    @staticmethod
    def backward(ctx, *grads):          # (differentiable: a copy into slices of a new tensor)
        like = next((g for g in grads if g is not None), None)
        if like is None:
            return None
        out = torch.empty_strided(ctx.shape, ctx.stride, dtype=like.dtype, device=like.device)
        for i, g in enumerate(grads):
            if g is None:
                out[i].zero_()
            else:
                out[i:i + 1].copy_(g)
        return out


_device_constants = {}      # (name, device) -> tensor made by device_constant


def device_constant(name: str, device, make) -> torch.Tensor:
    """`make(device)`'s tensor, made once per (name, device) and reused: a constant that the
    forward would otherwise build on every call (on a GPU a copy from the host each time).

    Made outside inference_mode, so that autograd can save it whatever mode the first call
    was in; made again if anything wrote into it; under torch.compile made afresh (a
    constant of the graph)."""
    if torch.compiler.is_compiling():
        return make(device)
    key = (name, torch.device(device))
    t = _device_constants.get(key)
    if t is None or t._version != 0:
        with torch.inference_mode(False):
            t = make(device)
        _device_constants[key] = t
    return t
