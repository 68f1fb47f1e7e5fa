"""Statistics reported from anywhere and reduced once per tick, across ranks when distributed.

    training_stats.report('Loss/G/loss', loss)        # inside any module, any rank
    collector = training_stats.Collector(regex='.*')
    collector.update()                                 # once per tick: reduces over ranks
    collector.mean('Loss/G/loss')

Every report adds (count, sum, sum of squares) to per-name accumulators in float64; a
Collector reads the change since its last update, so several collectors can coexist.
"""

import re

import numpy as np
import torch

_counters = {}          # name -> {device: float64 tensor [count, sum, sum_sq]}
_sync_device = None     # device for the all-reduce (cuda for NCCL)


def init_multiprocessing(sync_device: torch.device = None):
    """Set the device used to all-reduce statistics (call once per process when distributed)."""
    global _sync_device
    _sync_device = sync_device


def report(name: str, value) -> torch.Tensor:
    """Record the elements of `value` (scalar, array or tensor; NaN/inf excluded) under `name`.

    Tensors are accumulated on their own device: reporting never waits for the GPU; the
    collector moves the sums to the CPU once per update. Returns `value` unchanged.
    """
    elems = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    elems = elems.reshape(-1).to(torch.float64)
    finite = torch.isfinite(elems)
    elems = torch.where(finite, elems, torch.zeros_like(elems))
    moments = torch.stack([finite.sum().to(torch.float64), elems.sum(), elems.square().sum()])
    per_device = _counters.setdefault(name, {})
    if moments.device in per_device:
        per_device[moments.device].add_(moments)
    else:
        per_device[moments.device] = moments
    return value


def _total(name: str) -> torch.Tensor:
    """[count, sum, sum_sq] of `name` over every device, on the CPU (waits for pending work)."""
    total = torch.zeros(3, dtype=torch.float64)
    for moments in _counters.get(name, {}).values():
        total += moments.cpu()
    return total


def report0(name: str, value):
    """Report only on rank 0 (for values that are the same on every rank)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0:
        report(name, value)
    else:
        report(name, [])
    return value


def _is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class Collector:
    """Reads the statistics reported since the previous `update()` (names matching `regex`)."""

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._seen = {}         # name -> moments at the last update
        self._moments = {}      # name -> moments of the last interval
        self.update()
        self._moments.clear()

    def names(self):
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self):
        """Take the interval since the last update; all-reduce over ranks (every rank must call it)."""
        if not self._keep_previous:
            self._moments.clear()
        names = sorted(self.names())
        if _is_distributed():
            # Ranks may know different names: agree on the union first.
            all_names = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(all_names, names)
            names = sorted(set().union(*all_names))
        deltas = []
        for name in names:
            current = _total(name)
            deltas.append(current - self._seen.get(name, torch.zeros(3, dtype=torch.float64)))
            self._seen[name] = current.clone()
        if not deltas:
            return
        stacked = torch.stack(deltas)
        if _is_distributed():
            device = _sync_device or torch.device('cpu')
            stacked = stacked.to(device)
            torch.distributed.all_reduce(stacked)
            stacked = stacked.cpu()
        for name, moments in zip(names, stacked):
            if moments[0] > 0 or name not in self._moments:
                self._moments[name] = moments

    def moments(self, name: str) -> torch.Tensor:
        """(3,) float64 [count, sum, sum of squares] of the last interval (zeros when nothing was reported)."""
        m = self._moments.get(name)
        return torch.zeros(3, dtype=torch.float64) if m is None else m.clone()

    def num(self, name: str) -> int:
        m = self._moments.get(name)
        return 0 if m is None else int(m[0])

    def mean(self, name: str) -> float:
        m = self._moments.get(name)
        return float('nan') if m is None or m[0] == 0 else float(m[1] / m[0])

    def std(self, name: str) -> float:
        m = self._moments.get(name)
        if m is None or m[0] == 0:
            return float('nan')
        mean = m[1] / m[0]
        return float(np.sqrt(max(float(m[2] / m[0] - mean ** 2), 0.0)))

    def as_dict(self) -> dict:
        """{name: {num, mean, std}} for the last interval (JSON-ready)."""
        return {name: dict(num=self.num(name), mean=self.mean(name), std=self.std(name)) for name in sorted(self._moments)}

    def __getitem__(self, name: str) -> float:
        return self.mean(name)


def reset():
    """Forget everything reported (tests)."""
    _counters.clear()
