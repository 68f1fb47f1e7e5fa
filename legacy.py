"""Loading networks: this project's snapshots (no code execution) and, from the generation
issue on, official EG3D/Next3D pickles through a restricted unpickler."""

import os

import dnnlib
from torch_utils import persistence


def load_network_pkl(f) -> dnnlib.EasyDict:
    """Read a network file (path or binary file object) -> EasyDict(G, D, G_ema, training_set_kwargs, ...).

    Missing entries are None. Raises FileNotFoundError / persistence.CheckpointError with
    the file's name for files that are absent, truncated, or not loadable safely.
    """
    source = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, 'name', '<file object>')
    data = persistence.load_checkpoint(f, source)
    result = dnnlib.EasyDict(data)
    for key in ('G', 'D', 'G_ema', 'training_set_kwargs'):
        result.setdefault(key, None)
    if result.G_ema is None and result.G is not None:
        result.G_ema = result.G
    return result
