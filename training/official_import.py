"""Build this project's networks from official EG3D / Next3D network pickles.

`training.official_pickle.load_official_pickle` reads an official file into
`ModuleRecord`s (class name, constructor arguments, tensors) without running its code.
This module turns each record into our class:

    official class                                      ours
    training.triplane.TriPlaneGenerator                 EG3DGenerator(plane_axes='eg3d')
    training_avatar_texture.triplane*.TriPlaneGenerator Next3DGenerator(plane_axes='next3d',
      (with a texture_backbone)                           plane_layout='released', side_alpha='released')
    *.dual_discriminator.DualDiscriminator              DualDiscriminator

Constructor arguments come from the stored `_init_kwargs` of the record and of its
sub-records (the official code passes the sizes of its parts as keyword arguments:
backbone resolution/channels, StyleUNet in_size/final_size, ...); where the official code
hard-codes a size (super-resolution and decoder widths), it is read from the tensors.

Tensor names (official -> ours), applied explicitly per part:

    backbone.*, superresolution.*, decoder.*            same name
    texture_backbone.synthesis.*                        same name
    mouth_backbone.synthesis.{encoder,fusion,b*}.*      mouth_backbone.{encoder,fusion,b*}.*
    neural_blending.synthesis.{encoder,fusion,b*}.*     neural_blending.{encoder,fusion,b*}.*
    faces (1, F, 3), uvfaces (1, F, 3)                  rasterizer.faces, rasterizer.uvfaces (F, 3)
    raw_uvcoords (1, T, 2) in [0, 1], v up (OBJ)        rasterizer.uvcoords (T, 2), same convention
    D: b{res}.*, mapping.*                              same name

Skipped by design (reported, never an error): the three mapping networks that never run
(`texture_backbone.mapping`, `mouth_backbone.mapping`, `neural_blending.mapping`), the
StyleUNet blocks and fusion layers the official forward never reaches (mouth b4 and its
last fusion layer, blending b4-b32 and its last fusion layer), and the Next3D buffers
derived from the others or unused: `uvcoords` (DECA-style (2u - 1, 1 - 2v, 1); checked
against raw_uvcoords, or used to derive them when raw_uvcoords is absent), `face_uvcoords`,
`dense_faces`, `dataset_label_std`.

Fixed filters (reported as `fixed`): `resample_filter` buffers without a place here - D's
top-level and per-block ones, super-resolution's - hold the [1, 3, 3, 1] low-pass filter
that ours use as constants, and the official forward does not read them (resnet D;
image_raw is resized with antialiased interpolation). Each is checked against that
filter; one that differs is named in a note.

`neural_rendering_resolution` is the stored one (EG3D's second stage stores 128, the SR
input of a 512 model, not 512 // 8), else img_resolution // SR factor; an unusable stored
value is named in a note.

The face/eye UV mask: the published Next3D source keeps it as a plain tensor attribute
(`uv_face_mask`, not a registered buffer), so a pickle may or may not hold it. It is taken
from `uv_mask_path` when given, else from that attribute; without either, the imported
Next3D generator keeps `topology_loaded = False` and refuses to render.
"""

import numbers
import re
import warnings
from typing import Optional, Tuple

import numpy as np
import torch

from torch_utils import persistence
from torch_utils.ops import upfirdn2d
from training.dual_discriminator import DualDiscriminator
from training.eg3d_generator import DEFAULT_RENDERING_KWARGS
from training.eg3d_generator import EG3DGenerator
from training.next3d_generator import Next3DGenerator
from training.official_pickle import ModuleRecord

FLAME_NUM_VERTICES = 5023       # the official Next3D code splits v at this index
FLAME_NUM_FACES = 9976

# Official super-resolution classes -> our SR factor (output / SR input layout).
SR_CLASS_FACTORS = {
    'SuperresolutionHybrid8XDC': 8,
    'SuperresolutionHybrid8X': 8,
    'SuperresolutionHybrid4X': 4,
    'SuperresolutionHybrid2X': 2,
}
_GENERATOR_ARG_NAMES = ('z_dim', 'c_dim', 'w_dim', 'img_resolution', 'img_channels')
_SYNTHESIS_KEYS = ('channel_base', 'channel_max', 'num_fp16_res', 'conv_clamp', 'fused_modconv_default')
_MAPPING_KEYS = ('num_layers', 'embed_features', 'layer_features', 'activation', 'lr_multiplier', 'w_avg_beta')
_RENDERING_KEYS = tuple(DEFAULT_RENDERING_KWARGS) + ('deterministic_sampling', 'density_noise')
_NEXT3D_UNUSED_MAPPINGS = ('texture_backbone.mapping.', 'mouth_backbone.mapping.', 'neural_blending.mapping.')
_NEXT3D_DERIVED_BUFFERS = ('uvcoords', 'face_uvcoords', 'dense_faces', 'dataset_label_std')
_STYLE_UNETS = ('mouth_backbone', 'neural_blending')


_FIXED_FILTER = upfirdn2d.setup_filter([1, 3, 3, 1])      # the low-pass filter of every official resample_filter


class OfficialImportError(persistence.CheckpointError):
    """An official network that cannot be mapped onto our classes; the message names the file."""


# --- helpers ------------------------------------------------------------------------------

def _all_kwargs(record: ModuleRecord, arg_names=()) -> dict:
    """The record's constructor arguments by name (positional ones named by `arg_names`)."""
    kwargs = dict(zip(arg_names, record.init_args))
    kwargs.update(record.init_kwargs)
    return kwargs


def _child(record: ModuleRecord, name: str, source: str) -> ModuleRecord:
    child = record.children().get(name)
    if not isinstance(child, ModuleRecord):
        raise OfficialImportError(f'{source}: {record.class_name} has no sub-network {name!r}')
    return child


def _tensor(tensors: dict, name: str, source: str) -> torch.Tensor:
    if name not in tensors:
        raise OfficialImportError(f'{source}: the official network lacks the tensor {name!r}')
    return tensors[name]


def _short(cls_name: str) -> str:
    return cls_name.rsplit('.', 1)[-1]


def _new_report(kind: str, class_name: str, options: dict) -> dict:
    return dict(kind=kind, class_name=class_name, options=options, copied={}, skipped={}, fixed={}, not_in_ours=[],
                shape_mismatch=[], uninitialised=[], notes=[])


def _plain_mapping_kwargs(official: dict, report: dict, where: str) -> dict:
    out = {k: v for k, v in dict(official or {}).items() if k in _MAPPING_KEYS}
    ignored = sorted(set(dict(official or {})) - set(out))
    if ignored:
        report['notes'].append(f'{where}: ignored mapping options {ignored}')
    return out


def _rendering_kwargs(official: dict, report: dict) -> dict:
    official = dict(official or {})
    out = {k: official[k] for k in _RENDERING_KEYS if k in official}
    if 'avg_camera_pivot' in out:
        out['avg_camera_pivot'] = [float(x) for x in out['avg_camera_pivot']]
    if 'c_scale' not in official:
        out['c_scale'] = 0.0          # the official mapping reads rendering_kwargs.get('c_scale', 0)
        report['notes'].append("rendering_kwargs has no 'c_scale': 0 as in the official code (G ignores the camera)")
    ignored = sorted(set(official) - set(out) - {'superresolution_module'})
    if ignored:
        report['notes'].append(f'ignored rendering options {ignored}')
    return out


def _sr_factor(record: ModuleRecord, source: str) -> int:
    sr = _child(record, 'superresolution', source)
    factor = SR_CLASS_FACTORS.get(_short(sr.class_name))
    if factor is None:
        raise OfficialImportError(f'{source}: unsupported super-resolution module {sr.class_name} '
                                  f'(supported: {", ".join(sorted(SR_CLASS_FACTORS))})')
    return factor


def _generator_kwargs(record: ModuleRecord, tensors: dict, source: str, report: dict, force_fp16: bool) -> dict:
    """Constructor arguments shared by EG3DGenerator and Next3DGenerator."""
    kw = _all_kwargs(record, _GENERATOR_ARG_NAMES)
    missing = [k for k in _GENERATOR_ARG_NAMES if k not in kw]
    if missing:
        raise OfficialImportError(f'{source}: {record.class_name} was stored without the constructor arguments {missing}')
    backbone = _all_kwargs(_child(record, 'backbone', source), _GENERATOR_ARG_NAMES)
    synthesis = {k: kw[k] for k in _SYNTHESIS_KEYS if k in kw}
    if force_fp16:
        synthesis.update(num_fp16_res=4, conv_clamp=256)
    known = set(_GENERATOR_ARG_NAMES) | set(_SYNTHESIS_KEYS) | {'sr_num_fp16_res', 'mapping_kwargs', 'rendering_kwargs',
                                                                 'sr_kwargs', 'topology_path'}
    ignored = sorted(set(kw) - known)
    if ignored:
        report['notes'].append(f'ignored constructor arguments {ignored}')
    if 'topology_path' in kw:
        report['notes'].append('topology_path not used: the mesh topology comes from the pickled buffers')
    factor = _sr_factor(record, source)
    sr_official = dict(kw.get('sr_kwargs') or {})
    sr_kwargs = dict(
        num_fp16_res=int(kw.get('sr_num_fp16_res', 0)),
        block_channels=(int(_tensor(tensors, 'superresolution.block0.conv0.weight', source).shape[0]),
                        int(_tensor(tensors, 'superresolution.block1.conv0.weight', source).shape[0])),
        antialias=bool(dict(kw.get('rendering_kwargs') or {}).get('sr_antialias', True)))
    if 'fused_modconv_default' in sr_official:
        sr_kwargs['fused_modconv_default'] = sr_official['fused_modconv_default']
    rendering = _rendering_kwargs(kw.get('rendering_kwargs'), report)
    rendering.pop('sr_antialias', None)
    rendering['sr_antialias'] = sr_kwargs.pop('antialias')
    net0 = _tensor(tensors, 'decoder.net.0.weight', source)
    net2 = _tensor(tensors, 'decoder.net.2.weight', source)
    return dict(
        z_dim=int(kw['z_dim']), c_dim=int(kw['c_dim']), w_dim=int(kw['w_dim']),
        img_resolution=int(kw['img_resolution']), img_channels=int(kw['img_channels']),
        plane_resolution=int(backbone.get('img_resolution', 256)),
        plane_channels=int(backbone.get('img_channels', 96)) // 3,
        neural_rendering_resolution=int(kw['img_resolution']) // factor,
        mapping_kwargs=_plain_mapping_kwargs(kw.get('mapping_kwargs'), report, 'G'),
        synthesis_kwargs=synthesis, sr_kwargs=sr_kwargs, rendering_kwargs=rendering,
        decoder_kwargs=dict(hidden_dim=int(net0.shape[0]), decoder_output_dim=int(net2.shape[0]) - 1))


def _copy_tensors(module: torch.nn.Module, tensors: dict, rename, report: dict):
    """Copy official tensors into `module` through `rename(official) -> our name | ('skip', why) | None`."""
    ours = dict(module.state_dict(keep_vars=True))
    ours.pop('_extra_state', None)
    with torch.no_grad():
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                continue
            target = rename(name)
            if isinstance(target, tuple):
                report['skipped'][name] = target[1]
            elif (target is None or target not in ours) and name.rsplit('.', 1)[-1] == 'resample_filter':
                _check_fixed_filter(name, value, report)
            elif target is None or target not in ours:
                report['not_in_ours'].append(name)
            elif tuple(ours[target].shape) != tuple(value.shape):
                report['shape_mismatch'].append((target, name, tuple(ours[target].shape), tuple(value.shape)))
            else:
                ours[target].copy_(value.to(ours[target].dtype))
                report['copied'][target] = name
    return ours


def _check_fixed_filter(name: str, value: torch.Tensor, report: dict):
    if tuple(value.shape) == tuple(_FIXED_FILTER.shape) and torch.equal(value.float(), _FIXED_FILTER):
        report['fixed'][name] = 'the [1, 3, 3, 1] resampling filter, equal to ours (not read by the official forward)'
    else:
        report['notes'].append(f'{name} differs from the [1, 3, 3, 1] resampling filter ours use '
                               f'(not read by the official forward: no effect on the outputs)')


def _finish(report: dict, ours: dict, source: str, net_name: str, exempt=()):
    """Record what stayed uninitialised; raise if anything that runs was not filled."""
    report['uninitialised'] = [n for n in ours if n not in report['copied'] and n not in exempt]
    problems = []
    if report['shape_mismatch']:
        problems.append('shape mismatches ' + ', '.join(f'{o} {so} vs official {n} {sn}' for o, n, so, sn in report['shape_mismatch'][:8]))
    if report['uninitialised']:
        problems.append(f'{len(report["uninitialised"])} tensors missing from the official file: '
                        + ', '.join(report['uninitialised'][:8]) + (' ...' if len(report['uninitialised']) > 8 else ''))
    if problems:
        raise OfficialImportError(f'{source}: {net_name} ({report["class_name"]}) cannot be imported: ' + '; '.join(problems))


# --- generators ---------------------------------------------------------------------------

def network_kind(record: ModuleRecord) -> str:
    """'eg3d', 'next3d' or 'discriminator' for an official network record (ValueError otherwise)."""
    name = record.class_name
    if _short(name) == 'TriPlaneGenerator':
        return 'next3d' if 'texture_backbone' in record.children() else 'eg3d'
    if 'dual_discriminator' in name or _short(name).startswith('DualDiscriminator'):
        return 'discriminator'
    raise ValueError(f'unsupported official network class {name}')


def _set_nrr(G, record: ModuleRecord, report: dict):
    """The stored neural rendering resolution (e.g. 128 after EG3D's second stage)."""
    if 'neural_rendering_resolution' not in record.state:
        return
    nrr = record.state['neural_rendering_resolution']
    if isinstance(nrr, torch.Tensor) and nrr.numel() == 1 and not nrr.is_floating_point():
        nrr = nrr.item()
    if isinstance(nrr, numbers.Integral) and not isinstance(nrr, bool) and 0 < int(nrr) <= G.img_resolution:
        G.neural_rendering_resolution = int(nrr)
        report['notes'].append(f'neural_rendering_resolution {int(nrr)}, as stored')
    else:
        report['notes'].append(f'stored neural_rendering_resolution {nrr!r} not used: '
                               f'{G.neural_rendering_resolution} (img_resolution / SR factor)')


def import_eg3d_generator(record: ModuleRecord, source: str, force_fp16: bool = False) -> Tuple[EG3DGenerator, dict]:
    """Official EG3D TriPlaneGenerator record -> (EG3DGenerator with plane_axes='eg3d', report)."""
    tensors = record.named_tensors()
    report = _new_report('eg3d', record.class_name, dict(plane_axes='eg3d'))
    kwargs = _generator_kwargs(record, tensors, source, report, force_fp16)
    G = persistence.build_module(EG3DGenerator, dict(plane_axes='eg3d', **kwargs), source, tensors, exact=False)

    def rename(name):
        return name if name.startswith(('backbone.', 'superresolution.', 'decoder.')) else None

    ours = _copy_tensors(G, tensors, rename, report)
    _finish(report, ours, source, 'G')
    _set_nrr(G, record, report)
    return G.eval().requires_grad_(False), report


def _style_unet_kwargs(record: ModuleRecord, name: str, plane_resolution: int, source: str) -> dict:
    kw = _all_kwargs(_child(record, name, source), _GENERATOR_ARG_NAMES)
    for key in ('in_size', 'final_size', 'img_resolution'):
        if key not in kw:
            raise OfficialImportError(f'{source}: {name} was stored without its constructor argument {key!r}')
    if int(kw['img_resolution']) != plane_resolution:
        raise OfficialImportError(f'{source}: {name} outputs {kw["img_resolution"]}, not the plane resolution {plane_resolution}')
    if int(kw.get('num_cond_res', kw['in_size'])) != int(kw['in_size']):
        raise OfficialImportError(f'{source}: {name}: num_cond_res={kw["num_cond_res"]} != in_size={kw["in_size"]} '
                                  f'(only StyleUNets conditioned at every encoder scale are supported)')
    return dict(in_resolution=int(kw['in_size']), bottleneck_resolution=int(kw['final_size']))


def _unet_part(rest: str) -> str:
    """'b8.conv0.weight' -> 'b8', 'fusion.3.weight' -> 'fusion.3', 'encoder.0.conv1.bias' -> 'encoder.0'."""
    parts = rest.split('.')
    return parts[0] if re.fullmatch(r'b\d+', parts[0]) else '.'.join(parts[:2])


def _next3d_rename(G: Next3DGenerator):
    """official name -> our name, ('skip', why), ('topology', name) or None (no place here)."""
    built = {unet: {_unet_part(n[len(unet) + 1:]) for n in G.state_dict() if n.startswith(unet + '.')} for unet in _STYLE_UNETS}

    def rename(name):
        if name.startswith(_NEXT3D_UNUSED_MAPPINGS):
            return ('skip', 'mapping network never run (the backbone mapping makes all ws)')
        if name.startswith(('backbone.', 'superresolution.', 'decoder.', 'texture_backbone.synthesis.')):
            return name
        for unet in _STYLE_UNETS:
            prefix = unet + '.synthesis.'
            if name.startswith(prefix):
                rest = name[len(prefix):]
                part = _unet_part(rest)
                if re.fullmatch(r'b\d+|fusion\.\d+', part) and part not in built[unet]:
                    return ('skip', 'StyleUNet block / fusion layer the official forward never reaches')
                return f'{unet}.{rest}'
        if name in _NEXT3D_DERIVED_BUFFERS:
            return ('skip', 'derived from the other topology buffers, or unused')
        if name in ('faces', 'uvfaces', 'raw_uvcoords'):
            return ('topology', name)
        return None
    return rename


def _import_topology(G: Next3DGenerator, record: ModuleRecord, tensors: dict, source: str,
                     uv_mask_path: Optional[str], report: dict) -> bool:
    """Fill the rasterizer's faces / uvfaces / uvcoords / uv_mask; True when the mask was found too."""
    faces = _tensor(tensors, 'faces', source).reshape(-1, 3)
    uvfaces = _tensor(tensors, 'uvfaces', source).reshape(-1, 3)
    if 'raw_uvcoords' in tensors:
        uv = tensors['raw_uvcoords'].reshape(-1, 2).float()            # OBJ vt: [0, 1], v up (ours too)
        if 'uvcoords' in tensors:
            deca = tensors['uvcoords'].reshape(-1, 3).float()
            expected = torch.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2], dim=1)
            if not torch.allclose(deca[:, :2], expected, atol=1e-5):
                report['notes'].append('uvcoords disagrees with raw_uvcoords; raw_uvcoords used')
    elif 'uvcoords' in tensors:
        deca = tensors['uvcoords'].reshape(-1, 3).float()             # (2u - 1, 1 - 2v, 1): image y down
        uv = torch.stack([(deca[:, 0] + 1) / 2, (1 - deca[:, 1]) / 2], dim=1)
        report['notes'].append('raw_uvcoords absent: UVs derived from the DECA-style uvcoords')
    else:
        raise OfficialImportError(f'{source}: the official Next3D generator lacks the tensor raw_uvcoords (and uvcoords)')
    mask = None
    if uv_mask_path is not None:
        from training.mesh.head_model import load_uv_mask
        try:
            mask = load_uv_mask(uv_mask_path, size=None)
        except ValueError as e:
            raise OfficialImportError(str(e)) from e
        report['notes'].append('face/eye UV mask from uv_mask_path')
    elif isinstance(record.state.get('uv_face_mask'), torch.Tensor):
        mask = record.state['uv_face_mask'].float()                    # row 0 = v = 1, as ours
        report['notes'].append('face/eye UV mask from the pickled uv_face_mask attribute')
    try:
        G.rasterizer.load_topology(faces.numpy(), uvfaces.numpy(), uv.numpy(), None if mask is None else np.asarray(mask).squeeze())
    except ValueError as e:
        raise OfficialImportError(f'{source}: topology buffers do not fit: {e}') from e
    for ours_name, official in (('rasterizer.faces', 'faces'), ('rasterizer.uvfaces', 'uvfaces'),
                                ('rasterizer.uvcoords', 'raw_uvcoords' if 'raw_uvcoords' in tensors else 'uvcoords')):
        report['copied'][ours_name] = official
    if mask is None:
        report['notes'].append('no face/eye UV mask: the generator cannot render until one is given '
                               '(uv_mask_path= of legacy.load_network_pkl, or load_topology)')
        return False
    report['copied']['rasterizer.uv_mask'] = 'uv_mask_path' if uv_mask_path is not None else 'uv_face_mask'
    return True


def import_next3d_generator(record: ModuleRecord, source: str, uv_mask_path: Optional[str] = None,
                            force_fp16: bool = False) -> Tuple[Next3DGenerator, dict]:
    """Official Next3D TriPlaneGenerator record -> (Next3DGenerator with the released layout, report)."""
    tensors = record.named_tensors()
    options = dict(plane_axes='next3d', plane_layout='released', side_alpha='released')
    report = _new_report('next3d', record.class_name, options)
    kwargs = _generator_kwargs(record, tensors, source, report, force_fp16)
    plane_res = kwargs['plane_resolution']
    texture = _all_kwargs(_child(record, 'texture_backbone', source), _GENERATOR_ARG_NAMES)
    backbone = _all_kwargs(_child(record, 'backbone', source), _GENERATOR_ARG_NAMES)
    faces = _tensor(tensors, 'faces', source).reshape(-1, 3)
    num_faces = int(faces.shape[0])
    num_vertices = FLAME_NUM_VERTICES if num_faces == FLAME_NUM_FACES else int(faces.max()) + 1
    if num_vertices != FLAME_NUM_VERTICES:
        report['notes'].append(f'not FLAME\'s topology: num_vertices={num_vertices} from the largest face index')
    uv_source = tensors.get('raw_uvcoords', tensors.get('uvcoords'))
    if uv_source is None:
        raise OfficialImportError(f'{source}: the official Next3D generator lacks the tensor raw_uvcoords (and uvcoords)')
    G = persistence.build_module(Next3DGenerator, dict(
        num_vertices=num_vertices, num_faces=num_faces, num_uvs=int(uv_source.reshape(-1, uv_source.shape[-1]).shape[0]),
        texture_resolution=int(texture.get('img_resolution', 256)),
        mouth_kwargs=_style_unet_kwargs(record, 'mouth_backbone', plane_res, source),
        blending_kwargs=_style_unet_kwargs(record, 'neural_blending', plane_res, source),
        **options, **kwargs), source, tensors, exact=False)
    if 'mapping_ws' in backbone and int(backbone['mapping_ws']) != G.num_ws:
        raise OfficialImportError(f'{source}: the backbone mapping makes {backbone["mapping_ws"]} ws, ours {G.num_ws}')

    rename = _next3d_rename(G)
    topology = {n for n in tensors if rename(n) == ('topology', n)}
    ours = _copy_tensors(G, {n: t for n, t in tensors.items() if n not in topology}, rename, report)
    has_mask = _import_topology(G, record, tensors, source, uv_mask_path, report)
    _finish(report, ours, source, 'G', exempt=() if has_mask else ('rasterizer.uv_mask',))
    G.topology_loaded = has_mask
    if not has_mask:
        warnings.warn(f'{source}: no face/eye UV mask in the official Next3D pickle: pass uv_mask_path '
                      f'(FLAME\'s uv_face_eye_mask.png) to render with the imported generator', stacklevel=3)
    _set_nrr(G, record, report)
    return G.eval().requires_grad_(False), report


# --- discriminator ------------------------------------------------------------------------

def import_discriminator(record: ModuleRecord, source: str, force_fp16: bool = False) -> Tuple[DualDiscriminator, dict]:
    """Official (EG3D or Next3D) DualDiscriminator record -> (DualDiscriminator, report)."""
    tensors = record.named_tensors()
    report = _new_report('discriminator', record.class_name, {})
    kw = _all_kwargs(record, ('c_dim', 'img_resolution', 'img_channels'))
    if kw.get('architecture', 'resnet') != 'resnet':
        raise OfficialImportError(f'{source}: D architecture {kw["architecture"]!r} is not supported (only resnet)')
    block, mapping, epilogue = (dict(kw.get(k) or {}) for k in ('block_kwargs', 'mapping_kwargs', 'epilogue_kwargs'))
    num_layers = len({n.split('.')[1] for n in tensors if re.match(r'mapping\.fc\d+\.', n)})
    kwargs = dict(
        c_dim=int(kw['c_dim']), img_resolution=int(kw['img_resolution']), img_channels=int(kw.get('img_channels', 3)),
        channel_base=int(kw.get('channel_base', 32768)), channel_max=int(kw.get('channel_max', 512)),
        num_fp16_res=4 if force_fp16 else int(kw.get('num_fp16_res', 4)),
        conv_clamp=256 if force_fp16 else kw.get('conv_clamp', 256), cmap_dim=kw.get('cmap_dim'),
        disc_c_noise=float(kw.get('disc_c_noise', 0)),
        mapping_layers=int(mapping.get('num_layers', num_layers or 8)),
        mbstd_group_size=epilogue.get('mbstd_group_size', 4), mbstd_num_channels=int(epilogue.get('mbstd_num_channels', 1)),
        freeze_layers=int(block.get('freeze_layers', 0)))
    D = persistence.build_module(DualDiscriminator, kwargs, source, tensors, exact=False)

    def rename(name):
        return name if re.match(r'(b\d+|mapping)\.', name) else None

    ours = _copy_tensors(D, tensors, rename, report)
    _finish(report, ours, source, 'D')
    return D.eval().requires_grad_(False), report


def import_network(record: ModuleRecord, source: str, uv_mask_path: Optional[str] = None,
                   force_fp16: bool = False) -> Tuple[torch.nn.Module, dict]:
    """Any supported official network record -> (our module, report)."""
    try:
        kind = network_kind(record)
    except ValueError as e:
        raise OfficialImportError(f'{source}: {e}') from e
    if kind == 'eg3d':
        return import_eg3d_generator(record, source, force_fp16=force_fp16)
    if kind == 'next3d':
        return import_next3d_generator(record, source, uv_mask_path=uv_mask_path, force_fp16=force_fp16)
    return import_discriminator(record, source, force_fp16=force_fp16)


def format_report(reports: dict) -> str:
    """A readable summary of {network name: report} for scripts to print."""
    lines = []
    for net, r in reports.items():
        lines.append(f'{net}: official {r["class_name"]} -> {r["kind"]}'
                     + (f' ({", ".join(f"{k}={v!r}" for k, v in r["options"].items())})' if r['options'] else ''))
        lines.append(f'  copied {len(r["copied"])} tensors; skipped {len(r["skipped"])} unused official tensors; '
                     f'{len(r["fixed"])} fixed filters equal to ours; '
                     f'{len(r["not_in_ours"])} official tensors without a place here; '
                     f'{len(r["shape_mismatch"])} shape mismatches; {len(r["uninitialised"])} left uninitialised')
        groups = {}
        for name, why in r['skipped'].items():
            parts = name.split('.')
            key = '.'.join(parts[:3] if len(parts) > 3 and parts[1] == 'synthesis' else parts[:2])
            groups.setdefault((key, why), 0)
            groups[(key, why)] += 1
        for (key, why), n in sorted(groups.items()):
            lines.append(f'    skipped {key}{".*" if n > 1 else ""} ({n}): {why}')
        for name, why in r['fixed'].items():
            lines.append(f'    fixed {name}: {why}')
        for name in r['not_in_ours']:
            lines.append(f'    not in ours: {name}')
        for name in r['uninitialised']:
            lines.append(f'    uninitialised: {name}')
        for note in r['notes']:
            lines.append(f'    note: {note}')
    return '\n'.join(lines)
