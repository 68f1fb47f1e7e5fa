"""Build pickles with the structure of official EG3D/Next3D network files, for tests.

Official files reduce every network object to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`; some classes are pickled by
reference (e.g. `training.triplane.OSGDecoder`). These builders reproduce that structure
with `module_src` strings that write a marker file and raise if they are ever executed.
"""

import collections
import contextlib
import pickle
import sys
import types

import torch

EVIL_SRC = ("import os, pathlib\n"
            "pathlib.Path(os.environ.get('NEXT3D_PWNED', 'pwned.txt')).write_text('module_src ran')\n"
            "raise RuntimeError('module_src was executed')\n")


def _reconstruct_persistent_obj(meta):       # stands in for the official function while pickling
    raise RuntimeError('never called')


class PersistentStandIn:
    """Pickles exactly like an official persistent object."""

    def __init__(self, class_name, init_args=(), init_kwargs=None, params=None, buffers=None, modules=None, **attrs):
        state = dict(attrs)
        state.update(
            _init_args=tuple(init_args), _init_kwargs=dict(init_kwargs or {}),
            training=False,
            _parameters=collections.OrderedDict((k, torch.nn.Parameter(v, requires_grad=False)) for k, v in (params or {}).items()),
            _buffers=collections.OrderedDict(buffers or {}),
            _modules=collections.OrderedDict(modules or {}),
        )
        self.meta = dict(type='class', version=6, module_src=EVIL_SRC, class_name=class_name, state=state)

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (self.meta,))


@contextlib.contextmanager
def official_names():
    """Make the stand-ins pickle under the official global names."""
    import torch_utils.persistence as tp
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    had = hasattr(tp, '_reconstruct_persistent_obj')
    tp._reconstruct_persistent_obj = _reconstruct_persistent_obj
    fake_modules, classes = {}, {}
    for mod_name, cls_name in [('training.triplane', 'OSGDecoder'),
                               ('training.volumetric_rendering.renderer', 'ImportanceRenderer'),
                               ('training.volumetric_rendering.ray_sampler', 'RaySampler')]:
        if mod_name not in sys.modules:
            module = types.ModuleType(mod_name)
            cls = type(cls_name, (torch.nn.Module,), {'__module__': mod_name})
            setattr(module, cls_name, cls)
            fake_modules[mod_name] = module
            classes[f'{mod_name}.{cls_name}'] = cls
    sys.modules.update(fake_modules)
    try:
        yield classes
    finally:
        for name in fake_modules:
            sys.modules.pop(name, None)
        if not had:
            del tp._reconstruct_persistent_obj


def dumps_official(build) -> bytes:
    """Pickle `build(classes)` under the official names; `classes` maps by-reference class names to classes."""
    with official_names() as classes:
        return pickle.dumps(build(classes), protocol=4)
