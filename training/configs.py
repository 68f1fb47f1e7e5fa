"""Network presets: `make_generator(cfg)` and `make_discriminator(cfg)`.

    ffhq512        Next3D at FFHQ 512 with the published sizes (FLAME topology).
    ffhq512-eg3d   EG3D at FFHQ 512 (the baseline and resume source).
    small128       Next3D, output 128, raw rendering 64, moderate channels: a demo model
                   that trains on a CPU.
    tiny64         Next3D, output 64, raw rendering 32, few channels: tests (a forward pass
                   well under a second on a CPU).
    tiny64-eg3d    EG3D with tiny64's sizes.
    ffhq512-gaussian, small128-gaussian, tiny64-gaussian
                   GaussianGenerator (3D Gaussians on the mesh, splatted; no super-resolution):
                   a 256 / 64 / 32 UV grid of Gaussians, D as the Next3D preset of that size.

Overrides replace constructor arguments; for dict arguments (rendering_kwargs, sr_kwargs,
...) they update the preset's dict key by key. Presets are plain data, so the resulting
arguments can be written to training_options.json.

Mesh topology: ffhq512 and ffhq512-gaussian have FLAME's sizes (5023 vertices, 9976 faces,
5118 UVs); pass `template_obj` (FLAME's head_template.obj) and `uv_mask` to fill the
topology buffers. The small mesh-driven presets default to the project's bundled head
model when it is present.
"""

import contextlib
import copy
import os
from typing import Optional

import torch

from training.dual_discriminator import DualDiscriminator
from training import gaussian_generator
from training import next3d_generator
from training.eg3d_generator import EG3DGenerator
from training.superresolution import sr_factor

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
# Gaussian presets: output = splatting resolution (no super-resolution, as GGHead).
_GAUSSIAN_G = dict(
    z_dim=512, c_dim=25, w_dim=512, img_resolution=512, img_channels=3, **FLAME_TOPOLOGY,
    uv_resolution=256, mouth_resolution=32, background_resolution=64, feature_channels=3, neural_rendering_resolution=512,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None),
    rendering_kwargs=dict(image_resolution=512),
)
_SMALL_GAUSSIAN_G = dict(
    z_dim=128, c_dim=25, w_dim=128, img_resolution=128, img_channels=3,
    uv_resolution=64, mouth_resolution=16, background_resolution=32, feature_channels=3, neural_rendering_resolution=128,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=4096, channel_max=64, num_fp16_res=0, conv_clamp=None),
    rendering_kwargs=dict(image_resolution=128),
)
_TINY_GAUSSIAN_G = dict(
    z_dim=64, c_dim=25, w_dim=64, img_resolution=64, img_channels=3,
    uv_resolution=32, mouth_resolution=8, background_resolution=16, feature_channels=3, neural_rendering_resolution=64,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=512, channel_max=32, num_fp16_res=0, conv_clamp=None),
    rendering_kwargs=dict(image_resolution=64),
)
_SMALL_D = dict(img_resolution=128, channel_base=4096, channel_max=64, num_fp16_res=0, conv_clamp=None)
_TINY_D = dict(img_resolution=64, channel_base=512, channel_max=32, num_fp16_res=0, conv_clamp=None, mapping_layers=2)

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
        D=_SMALL_D),
    'tiny64': dict(
        generator='next3d',
        G={**_TINY_G, 'texture_resolution': 64, 'mouth_kwargs': dict(in_resolution=16, bottleneck_resolution=4),
           'blending_kwargs': dict(bottleneck_resolution=16)},
        D=_TINY_D),
    'tiny64-eg3d': dict(generator='eg3d', G=_TINY_G, D=_TINY_D),
    'ffhq512-gaussian': dict(generator='gaussian', G=_GAUSSIAN_G, D=_FFHQ_D),
    'small128-gaussian': dict(generator='gaussian', G=_SMALL_GAUSSIAN_G, D=_SMALL_D),
    'tiny64-gaussian': dict(generator='gaussian', G=_TINY_GAUSSIAN_G, D=_TINY_D),
}
GENERATOR_CLASSES = {'next3d': next3d_generator.Next3DGenerator, 'eg3d': EG3DGenerator,
                     'gaussian': gaussian_generator.GaussianGenerator}
# Mesh-driven generators and the function that fills their topology buffers from a template.
TOPOLOGY_LOADERS = {'next3d': next3d_generator.load_topology, 'gaussian': gaussian_generator.load_topology}


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


def default_template(cfg: str) -> Optional[str]:
    """The template a preset's generator uses when none is given: the bundled head model for the
    small mesh-driven presets (those without FLAME's sizes), if present; else None."""
    preset = _check_cfg(cfg)
    if (preset['generator'] in TOPOLOGY_LOADERS and not any(k in preset['G'] for k in FLAME_TOPOLOGY)
            and os.path.isfile(BUNDLED_TEMPLATE)):
        return BUNDLED_TEMPLATE
    return None


def check_rendering_resolution(cfg: str, img_resolution: int, neural_rendering_resolution: int):
    """Raise ValueError unless the preset's generator can make img_resolution images from renders
    at neural_rendering_resolution: a super-resolution factor (2, 4, 8), or 1 for Gaussian
    presets (they splat at the output resolution and need no super-resolution)."""
    if _check_cfg(cfg)['generator'] == 'gaussian' and neural_rendering_resolution == img_resolution:
        return
    sr_factor(img_resolution, neural_rendering_resolution)


def _bundled_default(cfg: str, template_obj: Optional[str], uv_mask: Optional[str], overrides: dict):
    """The bundled head model's template and mask for small mesh-driven presets when no topology is given."""
    if template_obj is None and not any(k in overrides for k in FLAME_TOPOLOGY) and default_template(cfg) is not None:
        return BUNDLED_TEMPLATE, (uv_mask if uv_mask is not None else (BUNDLED_UV_MASK if os.path.isfile(BUNDLED_UV_MASK) else None))
    return template_obj, uv_mask


def generator_kwargs(cfg: str, template_obj: Optional[str] = None, **overrides) -> dict:
    """Constructor arguments of the preset's generator class with overrides (plain data)."""
    preset = _check_cfg(cfg)
    kwargs = _merge(preset['G'], overrides)
    template_obj, _ = _bundled_default(cfg, template_obj, None, overrides)
    if preset['generator'] in TOPOLOGY_LOADERS:
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
    """Build the preset's generator (EG3DGenerator, Next3DGenerator or GaussianGenerator).

    For mesh-driven presets the topology buffers are filled from `template_obj` (+ `uv_mask`);
    small presets default to the bundled head model unless topology sizes are given.
    Without a template (e.g. to count parameters, or on the 'meta' device) the buffers
    stay empty and G refuses to render until its module's `load_topology` is called.
    """
    preset = _check_cfg(cfg)
    template_obj, uv_mask = _bundled_default(cfg, template_obj, uv_mask, overrides)
    kwargs = generator_kwargs(cfg, template_obj=template_obj, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        G = GENERATOR_CLASSES[preset['generator']](**kwargs)
    if template_obj is not None and preset['generator'] in TOPOLOGY_LOADERS and G.rasterizer.faces.device.type != 'meta':
        TOPOLOGY_LOADERS[preset['generator']](G, template_obj, uv_mask)
    return G


def make_discriminator(cfg: str, c_dim: int = 25, device: Optional[torch.device] = None, **overrides) -> DualDiscriminator:
    """Build the preset's dual discriminator for labels of `c_dim` values (25, or 25 + expression)."""
    kwargs = _merge(_check_cfg(cfg)['D'], dict(c_dim=c_dim, **overrides))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return DualDiscriminator(**kwargs)
