"""Process groups and gradient reduction for data-parallel training.

Two ways to start N processes:
- `--gpus=N` on one machine: train.py spawns N processes that meet through a file
  (or a localhost TCP port) -> `init(rank, world_size, init_method)`.
- `torchrun` across machines: each process finds RANK, WORLD_SIZE, LOCAL_RANK and the
  rendezvous in its environment -> `init_from_env()`.
NCCL is used on GPUs, gloo on the CPU. No DistributedDataParallel wrapper: as in EG3D,
each phase's gradients are flattened into one tensor, all-reduced and averaged, which
also works for parameters that some phases do not touch.
"""

import os
import time

import torch

from torch_utils import misc, training_stats


def env_rank() -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK set by torchrun, or None when not launched by it."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return None
    return dict(rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']),
                local_rank=int(os.environ.get('LOCAL_RANK', os.environ['RANK'])))


def default_backend(device: torch.device) -> str:
    return 'nccl' if device.type == 'cuda' else 'gloo'


def init(rank: int, world_size: int, device: torch.device, init_method: str = 'env://'):
    """Join the process group (no-op for one process) and route training_stats' reductions."""
    if world_size <= 1:
        return
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    backend = default_backend(device)
    torch.distributed.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)
    training_stats.init_multiprocessing(sync_device=device if backend == 'nccl' else None)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def barrier():
    if is_initialized() and world_size() > 1:
        torch.distributed.barrier()


# Before torch 2.8 (pytorch/pytorch#154976) the process group's destructor joins gloo's worker
# threads holding the GIL, while a worker may still be freeing a finished collective whose
# tensors Python has dropped, which takes the GIL: a deadlock (seen in about 1 of 7 runs of a
# two-rank gloo script with torch 2.6, and in the suite's two-process test with 2.4.1 and 2.6.0).
# Sleeping first (which lets the GIL go) gives them the time to finish.
GLOO_DRAIN_SECONDS = 0.05


def shutdown():
    """Leave the process group (after GLOO_DRAIN_SECONDS with gloo, see above)."""
    if is_initialized():
        if torch.distributed.get_backend() == 'gloo':
            time.sleep(GLOO_DRAIN_SECONDS)
        torch.distributed.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (returned as is by a single process, group or not)."""
    if not is_initialized() or world_size() <= 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def set_tf32(allow: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions, both set explicitly (recent PyTorch enables cuDNN's by default).

    Training turns it off, as StyleGAN2-ADA and EG3D do: R1 and the lazy regularizers
    need full float32 gradients.
    """
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def broadcast_module(module: torch.nn.Module, src: int = 0):
    """Copy rank `src`'s parameters and buffers to every rank (in place)."""
    if not is_initialized() or world_size() <= 1:
        return
    for tensor in [p.data for p in module.parameters()] + list(module.buffers()):
        torch.distributed.broadcast(tensor, src=src)


def all_reduce_grads(params):
    """Average the gradients of `params` over ranks and replace NaN/inf (in place).

    Every rank must pass the same parameter list. A parameter with a gradient on some rank
    counts as zeros on the others, so ranks that skipped a branch stay in step; one with no
    gradient on any rank keeps `grad = None`, so the optimizer leaves it (and its moments)
    alone, as EG3D does.
    """
    params = [p for p in params if p.numel() > 0]
    if not params:
        return
    n = world_size()
    if n > 1:       # which parameters have a gradient on some rank (one round trip to the host)
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        torch.distributed.all_reduce(has_grad)
        params = [p for p, h in zip(params, has_grad.tolist()) if h > 0]
    else:           # one process: known on the host, no device copy and no sync
        params = [p for p in params if p.grad is not None]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    if n > 1:
        torch.distributed.all_reduce(flat)
        flat /= n
    torch.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.reshape(p.shape)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any rank (every rank must call it)."""
    if not is_initialized() or world_size() <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


check_consistency = misc.check_ddp_consistency
