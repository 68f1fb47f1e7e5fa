"""The only classes a configuration may name.

Run options (`training_options.json`), snapshots and official pickles name the dataset,
the networks, the optimizers and the augmentation by dotted class name, as StyleGAN's
`class_name` keys do. Nothing is ever looked up by that name: each kind has a fixed table
of this project's classes (plus the official code's names for the same things), and any
other name is an error that says where it came from. Dataset arguments are checked as
plain data of the expected keys and types before anything is opened.

    G = builders.build('network', G_kwargs)                  # class_name + constructor kwargs
    opt = builders.build('optimizer', opt_kwargs, params)
    dataset = builders.open_dataset(training_set_kwargs, source='net.pkl')
"""

import numbers


class ConfigError(ValueError):
    """A configuration that names something we do not build, or holds bad values; the message says where from."""


def _network_classes() -> dict:
    from training import configs
    from training.dual_discriminator import DualDiscriminator
    from training.eg3d_generator import EG3DGenerator
    from training.gaussian_generator import GaussianGenerator
    from training.next3d_generator import Next3DGenerator
    return {
        'training.configs.make_generator': configs.make_generator,
        'training.configs.make_discriminator': configs.make_discriminator,
        'training.eg3d_generator.EG3DGenerator': EG3DGenerator,
        'training.next3d_generator.Next3DGenerator': Next3DGenerator,
        'training.gaussian_generator.GaussianGenerator': GaussianGenerator,
        'training.dual_discriminator.DualDiscriminator': DualDiscriminator,
    }


def _optimizer_classes() -> dict:
    import torch
    return {'torch.optim.Adam': torch.optim.Adam}


def _augment_classes() -> dict:
    from training.augment import AugmentPipe
    return {'training.augment.AugmentPipe': AugmentPipe}


def _dataset_classes() -> dict:
    from training.dataset import MeshImageDataset
    return {
        'training.dataset.MeshImageDataset': MeshImageDataset,
        'training.dataset.ImageFolderDataset': MeshImageDataset,                     # EG3D's name
        'training_avatar_texture.dataset.ImageFolderDataset': MeshImageDataset,      # Next3D's name
    }


_TABLES = {'network': _network_classes, 'optimizer': _optimizer_classes, 'augment': _augment_classes, 'dataset': _dataset_classes}


def lookup(kind: str, class_name, source: str = 'options'):
    """The class (or factory) of `kind` ('network', 'optimizer', 'augment', 'dataset') named `class_name`."""
    table = _TABLES[kind]()
    if not isinstance(class_name, str) or class_name not in table:
        raise ConfigError(f'{source}: {kind} class {class_name!r} is not one this project builds '
                          f'(known: {", ".join(sorted(table))})')
    return table[class_name]


def build(kind: str, kwargs: dict, *args, source: str = 'options', **extra):
    """Call the class of `kind` named by kwargs['class_name'] with *args and the other kwargs (+ extra)."""
    kwargs = dict(kwargs)
    cls = lookup(kind, kwargs.pop('class_name', None), source)
    return cls(*args, **kwargs, **extra)


# ----------------------------------------------------------------------------------------
# Dataset arguments: plain data of known keys and types.

_STR, _OPT_STR, _BOOL, _OPT_INT, _INT = 'str', 'str or null', 'bool', 'int or null', 'int'
_DATASET_ARGS = {
    'path': _STR, 'mesh_path': _OPT_STR, 'resolution': _OPT_INT, 'use_labels': _BOOL, 'xflip': _BOOL,
    'max_size': _OPT_INT, 'random_seed': _INT, 'load_lms': _BOOL, 'mirror_template': _OPT_STR, 'validate': _STR,
}
_VALIDATE_MODES = ('auto', 'full', 'first')
# Official Next3D's `load_exp` chose whether dataset_exp.json extends the label; ours reads it
# whenever it is present (D's label) and G takes the first 25 values, so it is dropped.
_OFFICIAL_IGNORED = {'load_exp'}


def _type_ok(value, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _OPT_STR:
        return value is None or isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return is_int if kind == _INT else (value is None or is_int)


def check_dataset_kwargs(kwargs, source: str = 'options') -> dict:
    """Validated dataset kwargs with our class name: {'class_name': ..., 'path': ..., ...}.

    Raises ConfigError naming `source` for an unknown class, unknown keys, values of the
    wrong type, or a missing path.
    """
    if not isinstance(kwargs, dict):
        raise ConfigError(f'{source}: training_set_kwargs must be a dict, found {type(kwargs).__name__}')
    class_name = kwargs.get('class_name', 'training.dataset.MeshImageDataset')
    lookup('dataset', class_name, f'{source}: training_set_kwargs')
    out = {'class_name': 'training.dataset.MeshImageDataset'}
    for key, value in kwargs.items():
        if key == 'class_name' or (key in _OFFICIAL_IGNORED and class_name != 'training.dataset.MeshImageDataset'):
            continue
        if key not in _DATASET_ARGS:
            raise ConfigError(f'{source}: training_set_kwargs: unknown key {key!r} (known: {", ".join(_DATASET_ARGS)})')
        if not _type_ok(value, _DATASET_ARGS[key]):
            raise ConfigError(f'{source}: training_set_kwargs.{key} must be {_DATASET_ARGS[key]}, found {type(value).__name__} {str(value)[:60]!r}')
        out[key] = int(value) if _DATASET_ARGS[key] in (_INT, _OPT_INT) and value is not None else value
    if not out.get('path'):
        raise ConfigError(f'{source}: training_set_kwargs names no dataset path')
    if out.get('validate', 'auto') not in _VALIDATE_MODES:
        raise ConfigError(f'{source}: training_set_kwargs.validate must be one of {", ".join(_VALIDATE_MODES)}, found {out["validate"]!r}')
    for key in ('resolution', 'max_size'):
        if out.get(key) is not None and out[key] < (1 if key == 'resolution' else 0):
            raise ConfigError(f'{source}: training_set_kwargs.{key} must be positive, found {out[key]}')
    return out


def open_dataset(kwargs: dict, source: str = 'options'):
    """The dataset `kwargs` describe (checked by check_dataset_kwargs first)."""
    return build('dataset', check_dataset_kwargs(kwargs, source), source=source)
