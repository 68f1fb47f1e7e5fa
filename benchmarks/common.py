"""What every benchmark needs: timing with GPU work included, and the provenance of a result
(device, git commit, machine load) to write beside the numbers."""

import os
import platform
import resource
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, 'benchmarks', 'results')

# Benchmarks time the precision that training and the parity tests use: full float32, TF32 off
# for both matmuls and cuDNN convolutions (set explicitly: cuDNN's TF32 is on by default).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1, cpu_time: bool = False):
    """Median wall seconds of fn() after `warmup` untimed calls, GPU work included.

    cpu_time: also return the median process CPU seconds (less sensitive than wall time to
    other load on a shared machine) as (wall, cpu).
    """
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    median = lambda values: sorted(values)[len(values) // 2]
    return (median(walls), median(cpus)) if cpu_time else median(walls)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the torch thread count."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return f'CPU {line.split(":", 1)[1].strip()} ({torch.get_num_threads()} threads)'
    except OSError:
        pass
    return f'CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)'


def git_commit(*paths: str) -> str:
    """Short HEAD commit, marked '(modified)' when any of `paths` has uncommitted changes.

    NEXT3D_COMMIT, when set, names the commit instead: for a copy of the tree sent to another
    machine, whose git metadata may be missing or older than its files. 'unknown' without either.
    """
    if os.environ.get('NEXT3D_COMMIT', '').strip():
        return os.environ['NEXT3D_COMMIT'].strip()
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'
    dirty = paths and subprocess.run(['git', 'status', '--porcelain', '--', *paths], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (' (modified)' if dirty else '')


def load_average() -> float:
    """1-minute system load average (nan where unknown)."""
    return os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU (Linux)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # kB -> GiB


def write_result(outdir: str, filename: str, text: str) -> str:
    """Write a benchmark's markdown to outdir/filename atomically (the folder made if missing),
    say where, and return the path."""
    from torch_utils.persistence import atomic_write_bytes     # (vs_original's parent imports no project torch code)
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, filename)
    atomic_write_bytes(path, text.encode())
    print(f'Wrote {path}')
    return path
