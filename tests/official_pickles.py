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


BY_REFERENCE_CLASSES = [
    ('training.triplane', 'OSGDecoder'),
    ('training.volumetric_rendering.renderer', 'ImportanceRenderer'),
    ('training.volumetric_rendering.ray_sampler', 'RaySampler'),
    ('training_avatar_texture.triplane_next3d', 'OSGDecoder'),
    ('training_avatar_texture.volumetric_rendering.renderer', 'ImportanceRenderer'),
    ('training_avatar_texture.volumetric_rendering.ray_sampler', 'RaySampler'),
]


@contextlib.contextmanager
def official_names():
    """Make the stand-ins pickle under the official global names.

    Modules of the official code base are faked in sys.modules for the duration (a real
    module of ours with the same name is set aside and restored afterwards).
    """
    import torch_utils.persistence as tp
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    had = hasattr(tp, '_reconstruct_persistent_obj')
    tp._reconstruct_persistent_obj = _reconstruct_persistent_obj
    saved, classes = {}, {}

    def fake_module(name):
        if name not in saved:
            saved[name] = sys.modules.get(name)
            sys.modules[name] = types.ModuleType(name)
        return sys.modules[name]

    for mod_name, cls_name in BY_REFERENCE_CLASSES:
        parts = mod_name.split('.')
        for i in range(1, len(parts)):          # parents must import too
            if '.'.join(parts[:i]) not in sys.modules:
                fake_module('.'.join(parts[:i]))
        module = fake_module(mod_name)
        cls = type(cls_name, (torch.nn.Module,), {'__module__': mod_name})
        setattr(module, cls_name, cls)
        classes[f'{mod_name}.{cls_name}'] = cls
    try:
        yield classes
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        if not had:
            del tp._reconstruct_persistent_obj


def dumps_official(build) -> bytes:
    """Pickle `build(classes)` under the official names; `classes` maps by-reference class names to classes."""
    with official_names() as classes:
        return pickle.dumps(build(classes), protocol=4)
