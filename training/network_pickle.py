"""Loading network files: this project's snapshots (no code execution) and official EG3D/Next3D
pickles through a restricted unpickler (training/official_pickle.py) mapped onto our
classes (training/official_import.py)."""

import copy
import io
import os
from typing import Optional

import dnnlib
from torch_utils import persistence

_ZIP_MAGIC = b'PK\x03\x04'      # torch.save's format (our snapshots); official files are plain pickles


def load_network_pkl(f, force_fp16: bool = False, uv_mask_path: Optional[str] = None) -> dnnlib.EasyDict:
    """Read a network file (path or binary file object) -> EasyDict(G, D, G_ema, training_set_kwargs, ...).

    Our snapshots load as saved. Official EG3D/Next3D pickles are read without running their
    embedded code and converted (EG3D -> EG3DGenerator(plane_axes='eg3d'), Next3D ->
    Next3DGenerator with the released layout); `result.import_report` then holds
    {network name: report} (see official_import.format_report) and `augment_pipe` is None.
    `uv_mask_path`: the face/eye UV mask image an official Next3D generator needs when its
    pickle lacks one. `force_fp16`: rebuild G's synthesis and D with 4 reduced-precision
    resolutions and conv_clamp 256 (as the official loader's option).

    Missing entries are None. Raises FileNotFoundError / persistence.CheckpointError with
    the file's name for files that are absent, truncated, or not loadable safely.
    """
    source = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, 'name', '<file object>')
    if isinstance(f, (str, os.PathLike)):
        if not os.path.isfile(f):
            raise FileNotFoundError(f'{source}: no such network file')
        with open(f, 'rb') as fobj:
            return _load(fobj, source, force_fp16, uv_mask_path)
    if not (hasattr(f, 'seekable') and f.seekable()):
        f = io.BytesIO(f.read())
    return _load(f, source, force_fp16, uv_mask_path)


def _load(fobj, source: str, force_fp16: bool, uv_mask_path: Optional[str]) -> dnnlib.EasyDict:
    start = fobj.tell()
    magic = fobj.read(4)
    fobj.seek(start)
    if magic == _ZIP_MAGIC or len(magic) < 4:
        result = dnnlib.EasyDict(persistence.load_checkpoint(fobj, source))
        if force_fp16:
            for key in ('G', 'D', 'G_ema'):
                if result.get(key) is not None:
                    result[key] = _with_fp16(result[key])
    else:
        result = _load_official(fobj, source, force_fp16, uv_mask_path)
    for key in ('G', 'D', 'G_ema', 'training_set_kwargs'):
        result.setdefault(key, None)
    if result.G_ema is None and result.G is not None:
        result.G_ema = result.G
    return result


def _load_official(fobj, source: str, force_fp16: bool, uv_mask_path: Optional[str]) -> dnnlib.EasyDict:
    from training import official_import
    from training.official_pickle import ModuleRecord, OfficialPickleError, load_official_pickle
    try:
        data = load_official_pickle(fobj, source)
    except OfficialPickleError as e:
        detail = str(e)[len(source) + 2:] if str(e).startswith(source + ': ') else str(e)
        raise persistence.CheckpointError(f'{source}: refused to load: not a snapshot of this project, and not an '
                                          f'official network pickle that can be read safely ({detail})') from e
    result = dnnlib.EasyDict(G=None, D=None, G_ema=None, augment_pipe=None, import_report={})
    tsk = data.get('training_set_kwargs')
    result.training_set_kwargs = dnnlib.EasyDict(tsk) if isinstance(tsk, dict) else None
    done = {}                                   # the same record under two names is converted once
    for key in ('G', 'G_ema', 'D'):
        record = data.get(key)
        if not isinstance(record, ModuleRecord):
            continue
        if id(record) not in done:
            try:
                done[id(record)] = official_import.import_network(record, f'{source} [{key}]', uv_mask_path=uv_mask_path,
                                                                  force_fp16=force_fp16)
            except (persistence.CheckpointError, OSError):       # these name their file already
                raise
            except Exception as e:      # a stored value of the wrong type or range (int('x'), dict(5), ...)
                raise persistence.CheckpointError(f'{source} [{key}]: cannot import the official network: '
                                                  f'{type(e).__name__}: {persistence.error_summary(e)}') from e
        result[key], result.import_report[key] = done[id(record)]
    return result


def _with_fp16(module):
    """Rebuild one of our networks with 4 reduced-precision resolutions and conv_clamp 256."""
    kwargs = copy.deepcopy(module.init_kwargs)
    if 'synthesis_kwargs' in kwargs:
        kwargs['synthesis_kwargs'] = {**(kwargs['synthesis_kwargs'] or {}), 'num_fp16_res': 4, 'conv_clamp': 256}
    elif 'num_fp16_res' in kwargs:
        kwargs.update(num_fp16_res=4, conv_clamp=256)
    else:
        return module
    rebuilt = type(module)(**kwargs)
    rebuilt.load_state_dict(module.state_dict())
    return rebuilt.eval().requires_grad_(False)
