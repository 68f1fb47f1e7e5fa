"""Network presets: `make_generator(cfg)` and `make_discriminator(cfg)`.

    ffhq512        Next3D at FFHQ 512 with the published sizes (FLAME topology).
    ffhq512-eg3d   EG3D at FFHQ 512 (the baseline and resume source).
    small128       Next3D, output 128, raw rendering 64, moderate channels: a demo model
                   that trains on a CPU.
    tiny64         Next3D, output 64, raw rendering 32, few channels: tests (a forward pass
                   well under a second on a CPU).
    tiny64-eg3d    EG3D with tiny64's sizes.

Overrides replace constructor arguments; for dict arguments (rendering_kwargs, sr_kwargs,
...) they update the preset's dict key by key. Presets are plain data, so the resulting
arguments can be written to training_options.json.

Mesh topology: ffhq512 has FLAME's sizes (5023 vertices, 9976 faces, 5118 UVs); pass
`template_obj` (FLAME's head_template.obj) and `uv_mask` to fill the topology buffers.
The small presets default to the project's bundled head model when it is present.
"""

import contextlib
import copy
import os
from typing import Optional

import torch

from training.dual_discriminator import DualDiscriminator
from training.eg3d_generator import EG3DGenerator
from training.next3d_generator import Next3DGenerator
from training.next3d_generator import load_topology

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_TEMPLATE = os.path.join(REPO_ROOT, 'data', 'head_model', 'head_template.obj')
BUNDLED_UV_MASK = os.path.join(REPO_ROOT, 'data', 'head_model', 'uv_face_eye_mask.png')
FLAME_TOPOLOGY = dict(num_vertices=5023, num_faces=9976, num_uvs=5118)

_FFHQ_G = dict(
    z_dim=512, c_dim=25, w_dim=512, img_resolution=512, img_channels=3,
    plane_resolution=256, plane_channels=32, neural_rendering_resolution=64,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None),
    sr_kwargs=dict(num_fp16_res=4),
    rendering_kwargs=dict(image_resolution=512),
)
_FFHQ_D = dict(img_resolution=512, channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256)

_TINY_G = dict(
    z_dim=64, c_dim=25, w_dim=64, img_resolution=64, img_channels=3,
    plane_resolution=64, plane_channels=32, neural_rendering_resolution=32,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=512, channel_max=32, num_fp16_res=0, conv_clamp=None),
    sr_kwargs=dict(num_fp16_res=0, block_channels=(16, 8)),
    rendering_kwargs=dict(image_resolution=64, depth_resolution=12, depth_resolution_importance=12),
)
_SMALL_G = dict(
    z_dim=128, c_dim=25, w_dim=128, img_resolution=128, img_channels=3,
    plane_resolution=128, plane_channels=32, neural_rendering_resolution=64,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=4096, channel_max=64, num_fp16_res=0, conv_clamp=None),
    sr_kwargs=dict(num_fp16_res=0, block_channels=(32, 16)),
    rendering_kwargs=dict(image_resolution=128, depth_resolution=24, depth_resolution_importance=24),
)

PRESETS = {
    'ffhq512': dict(
        generator='next3d',
        G={**_FFHQ_G, **FLAME_TOPOLOGY, 'texture_resolution': 256, 'mouth_kwargs': dict(in_resolution=64, bottleneck_resolution=4),
           'blending_kwargs': dict(bottleneck_resolution=32)},
        D=_FFHQ_D),
    'ffhq512-eg3d': dict(generator='eg3d', G=_FFHQ_G, D=_FFHQ_D),
    'small128': dict(
        generator='next3d',
        G={**_SMALL_G, 'texture_resolution': 128, 'mouth_kwargs': dict(in_resolution=32, bottleneck_resolution=4),
           'blending_kwargs': dict(bottleneck_resolution=16)},
        D=dict(img_resolution=128, channel_base=4096, channel_max=64, num_fp16_res=0, conv_clamp=None)),
    'tiny64': dict(
        generator='next3d',
        G={**_TINY_G, 'texture_resolution': 64, 'mouth_kwargs': dict(in_resolution=16, bottleneck_resolution=4),
           'blending_kwargs': dict(bottleneck_resolution=16)},
        D=dict(img_resolution=64, channel_base=512, channel_max=32, num_fp16_res=0, conv_clamp=None, mapping_layers=2)),
    'tiny64-eg3d': dict(
        generator='eg3d', G=_TINY_G,
        D=dict(img_resolution=64, channel_base=512, channel_max=32, num_fp16_res=0, conv_clamp=None, mapping_layers=2)),
}
GENERATOR_CLASSES = {'next3d': Next3DGenerator, 'eg3d': EG3DGenerator}


def _check_cfg(cfg: str) -> dict:
    if cfg not in PRESETS:
        raise ValueError(f'unknown network preset {cfg!r}; known: {sorted(PRESETS)}')
    return PRESETS[cfg]


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def template_sizes(template_obj: str) -> dict:
    """num_vertices, num_faces, num_uvs of a template OBJ."""
    from training.mesh import obj_io
    mesh = obj_io.read_obj(template_obj)
    if mesh.vt is None or mesh.ft is None:
        raise ValueError(f'{template_obj}: the template needs texture coordinates (vt) and v/vt face indices')
    return dict(num_vertices=len(mesh.v), num_faces=len(mesh.f), num_uvs=len(mesh.vt))


def _bundled_default(cfg: str, template_obj: Optional[str], uv_mask: Optional[str], overrides: dict):
    """The bundled head model's template and mask for small Next3D presets when no topology is given."""
    preset = _check_cfg(cfg)
    if (preset['generator'] == 'next3d' and template_obj is None and cfg != 'ffhq512'
            and not any(k in overrides for k in FLAME_TOPOLOGY) and os.path.isfile(BUNDLED_TEMPLATE)):
        return BUNDLED_TEMPLATE, (uv_mask if uv_mask is not None else (BUNDLED_UV_MASK if os.path.isfile(BUNDLED_UV_MASK) else None))
    return template_obj, uv_mask


def generator_kwargs(cfg: str, template_obj: Optional[str] = None, **overrides) -> dict:
    """Constructor arguments of the preset's generator class with overrides (plain data)."""
    preset = _check_cfg(cfg)
    kwargs = _merge(preset['G'], overrides)
    template_obj, _ = _bundled_default(cfg, template_obj, None, overrides)
    if preset['generator'] == 'next3d':
        if template_obj is not None:
            sizes = template_sizes(template_obj)
            for key, value in sizes.items():
                if key in overrides and overrides[key] != value:
                    raise ValueError(f'{template_obj}: has {key}={value}, but {key}={overrides[key]} was requested')
            kwargs.update(sizes)
        elif 'num_vertices' not in kwargs:
            raise ValueError(f'preset {cfg!r} needs a mesh topology: pass template_obj (the bundled head model '
                             f'{os.path.relpath(BUNDLED_TEMPLATE, REPO_ROOT)} is missing) or num_vertices/num_faces/num_uvs')
    return kwargs


def make_generator(cfg: str, template_obj: Optional[str] = None, uv_mask: Optional[str] = None,
                   device: Optional[torch.device] = None, **overrides) -> torch.nn.Module:
    """Build the preset's generator (EG3DGenerator or Next3DGenerator).

    For Next3D presets the topology buffers are filled from `template_obj` (+ `uv_mask`);
    small presets default to the bundled head model unless topology sizes are given.
    Without a template (e.g. to count parameters, or on the 'meta' device) the buffers
    stay empty and G refuses to render until `next3d_generator.load_topology` is called.
    """
    preset = _check_cfg(cfg)
    template_obj, uv_mask = _bundled_default(cfg, template_obj, uv_mask, overrides)
    kwargs = generator_kwargs(cfg, template_obj=template_obj, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        G = GENERATOR_CLASSES[preset['generator']](**kwargs)
    if template_obj is not None and preset['generator'] == 'next3d' and G.rasterizer.faces.device.type != 'meta':
        load_topology(G, template_obj, uv_mask)
    return G


def make_discriminator(cfg: str, c_dim: int = 25, device: Optional[torch.device] = None, **overrides) -> DualDiscriminator:
    """Build the preset's dual discriminator for labels of `c_dim` values (25, or 25 + expression)."""
    kwargs = _merge(_check_cfg(cfg)['D'], dict(c_dim=c_dim, **overrides))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return DualDiscriminator(**kwargs)
