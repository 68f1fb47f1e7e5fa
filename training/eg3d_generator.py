"""EG3D's tri-plane generator: StyleGAN2 tri-plane -> volume rendering -> super-resolution.

    ws = mapping(z, c * c_scale)                         [N, num_ws, w_dim]
    planes = backbone.synthesis(ws[:, :14])              [N, 3, 32, P, P]   (make_planes)
    features, depth = renderer(planes, decoder, rays(c)) at the neural rendering resolution r
    image = superresolution(features[:, :3], features, ws[:, :14])

`EG3DGenerator` is the baseline and the base class of `Next3DGenerator`, which overrides
`make_planes` (and takes the mesh condition `v`). EG3D accepts `v` and ignores it, so
callers can drive both models the same way.

`neural_rendering_resolution` is a plain attribute that training sets (it fades 64 -> 128
in EG3D's second stage); it is saved in checkpoints through the module's extra state.
`synthesis(..., neural_rendering_resolution=r)` overrides it for one call without
changing it (EG3D changed the attribute as a side effect).
"""

import copy
from typing import Optional

import torch

from torch_utils import misc
from torch_utils import persistence
from training import coords
from training.networks_stylegan2 import Generator as StyleGAN2Generator
from training.superresolution import SuperResolution
from training.superresolution import sr_factor
from training.triplane_decoder import OSGDecoder
from training.volumetric_rendering.ray_sampler import RaySampler
from training.volumetric_rendering.renderer import ImportanceRenderer

# EG3D's rendering options for FFHQ (keys as in EG3D's train.py; the renderer reads the
# sampling ones, the loss the regularisation ones, the scripts the camera ones).
DEFAULT_RENDERING_KWARGS = dict(
    image_resolution=512,               # output resolution (informational; set from the dataset)
    depth_resolution=48,                # stratified samples per ray
    depth_resolution_importance=48,     # importance samples per ray
    ray_start=coords.RAY_START,         # world units, or 'auto' (ray-box intersection)
    ray_end=coords.RAY_END,
    box_warp=coords.BOX_WARP,           # side of the tri-plane cube
    avg_camera_radius=coords.CAMERA_RADIUS,
    avg_camera_pivot=list(coords.CAMERA_PIVOT),
    clamp_mode='softplus',              # density activation
    white_back=False,
    disparity_space_sampling=False,
    c_gen_conditioning_zero=False,      # True: G's mapping sees zeros instead of the camera
    c_scale=1.0,                        # multiplier of G's conditioning label
    gpc_reg_prob=0.5,                   # generator pose conditioning swap probability (after the fade)
    superresolution_noise_mode='none',  # noise mode of the SR blocks: 'none' | 'random' | 'const'
    density_reg=0.25,                   # weight of the density regulariser
    density_reg_p_dist=0.004,           # perturbation of the density regulariser, world units
    reg_type='l1',
    decoder_lr_mul=1.0,
    sr_antialias=True,
)


def make_rendering_kwargs(**overrides) -> dict:
    """DEFAULT_RENDERING_KWARGS with `overrides` (unknown keys are an error)."""
    unknown = sorted(set(overrides) - set(DEFAULT_RENDERING_KWARGS) - {'deterministic_sampling', 'density_noise'})
    if unknown:
        raise ValueError(f'unknown rendering_kwargs {unknown}; known: {sorted(DEFAULT_RENDERING_KWARGS)}')
    out = copy.deepcopy(DEFAULT_RENDERING_KWARGS)
    out.update(overrides)
    return out


@persistence.persistent_class
class EG3DGenerator(torch.nn.Module):
    """z [N, z_dim], c [N, >= 25] -> dict(image [N, 3, R, R], image_raw [N, 3, r, r], image_depth [N, 1, r, r])."""

    def __init__(self,
        z_dim: int = 512,               # Latent z dimensionality.
        c_dim: int = 25,                # Conditioning label dimensionality (the camera: 25).
        w_dim: int = 512,               # Intermediate latent w dimensionality.
        img_resolution: int = 512,      # Output resolution R.
        img_channels: int = 3,          # Output channels.
        plane_resolution: int = 256,    # Tri-plane resolution P.
        plane_channels: int = 32,       # Channels per plane.
        neural_rendering_resolution: int = 64,   # Initial raw rendering resolution r.
        plane_axes: str = 'next3d',     # 'next3d' (fixed) or 'eg3d' (official EG3D weights), see coords.PLANE_AXES.
        mapping_kwargs: dict = None,    # MappingNetwork arguments (num_layers, ...).
        synthesis_kwargs: dict = None,  # SynthesisNetwork arguments of the backbone (channel_base, num_fp16_res, ...).
        sr_kwargs: dict = None,         # SuperResolution arguments other than channels/img_resolution/factor/w_dim.
        decoder_kwargs: dict = None,    # OSGDecoder arguments other than n_features/decoder_lr_mul.
        rendering_kwargs: dict = None,  # Overrides of DEFAULT_RENDERING_KWARGS.
        mapping_ws: Optional[int] = None,    # ws from the mapping, None = the backbone's (subclasses use more).
    ):
        super().__init__()
        if plane_axes not in coords.PLANE_AXES:
            raise ValueError(f'plane_axes must be one of {tuple(coords.PLANE_AXES)}, got {plane_axes!r}')
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.plane_resolution = plane_resolution
        self.plane_channels = plane_channels
        self.plane_axes = plane_axes
        self.rendering_kwargs = make_rendering_kwargs(**(rendering_kwargs or {}))
        self.neural_rendering_resolution = int(neural_rendering_resolution)

        self.backbone = StyleGAN2Generator(z_dim, c_dim, w_dim, img_resolution=plane_resolution, img_channels=3 * plane_channels,
                                           mapping_ws=mapping_ws, mapping_kwargs=mapping_kwargs, synthesis_kwargs=synthesis_kwargs)
        self.num_ws = self.backbone.mapping.num_ws
        self.num_backbone_ws = self.backbone.num_ws
        decoder_kwargs = dict(decoder_kwargs or {})
        self.decoder = OSGDecoder(n_features=plane_channels, decoder_lr_mul=self.rendering_kwargs['decoder_lr_mul'], **decoder_kwargs)
        self.renderer = ImportanceRenderer(plane_axes=plane_axes)
        self.ray_sampler = RaySampler()
        self.superresolution = SuperResolution(
            channels=self.decoder.decoder_output_dim, img_resolution=img_resolution, w_dim=w_dim,
            factor=sr_factor(img_resolution, self.neural_rendering_resolution), antialias=self.rendering_kwargs['sr_antialias'],
            img_channels=img_channels, **(sr_kwargs or {}))
        self._last_planes = None

    # --- checkpointed plain state --------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.neural_rendering_resolution, dtype=torch.int64)

    def set_extra_state(self, state):
        self.neural_rendering_resolution = int(state)

    # --- latent mapping ------------------------------------------------------------------
    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1, truncation_cutoff: Optional[int] = None,
                update_emas: bool = False) -> torch.Tensor:
        """z [N, z_dim], c [N, >= 25] -> ws [N, num_ws, w_dim] float32.

        The mapping sees c[:, :c_dim] * c_scale (zeros with c_gen_conditioning_zero).
        truncation_cutoff: truncate the first ws only; None truncates all of them (as the
        official code: all 28 of Next3D; the scripts' --trunc-cutoff=14 keeps its texture ws).
        """
        rk = self.rendering_kwargs
        c = c[:, :self.c_dim]
        if rk['c_gen_conditioning_zero']:
            c = torch.zeros_like(c)
        return self.backbone.mapping(z, c * rk['c_scale'], truncation_psi=truncation_psi,
                                     truncation_cutoff=truncation_cutoff, update_emas=update_emas)

    # --- tri-plane -----------------------------------------------------------------------
    def make_planes(self, ws: torch.Tensor, v: Optional[torch.Tensor], update_emas: bool = False, noise_mode: str = 'random',
                    force_fp32: bool = False, fused_modconv=None, geometry=None) -> torch.Tensor:
        """ws [N, num_ws, w_dim] -> tri-plane [N, 3, plane_channels, P, P] float32 (v and geometry ignored)."""
        del v, geometry
        planes = self.backbone.synthesis(ws[:, :self.num_backbone_ws], update_emas=update_emas, noise_mode=noise_mode,
                                         force_fp32=force_fp32, fused_modconv=fused_modconv)
        return planes.view(len(planes), 3, self.plane_channels, planes.shape[-2], planes.shape[-1])

    def _planes(self, ws, v, update_emas, cache_backbone, use_cached_backbone, **kwargs) -> torch.Tensor:
        if use_cached_backbone and self._last_planes is not None:
            planes = self._last_planes
        else:
            planes = self.make_planes(ws, v, update_emas=update_emas, **kwargs)
        if cache_backbone:
            self._last_planes = planes
        return planes

    # --- image synthesis -----------------------------------------------------------------
    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, v: Optional[torch.Tensor] = None,
                  neural_rendering_resolution: Optional[int] = None, update_emas: bool = False,
                  cache_backbone: bool = False, use_cached_backbone: bool = False,
                  noise_mode: str = 'random', force_fp32: bool = False, fused_modconv=None,
                  generator: Optional[torch.Generator] = None, geometry=None) -> dict:
        """ws [N, num_ws, w_dim], camera c [N, >= 25] (OpenCV cam2world + normalised intrinsics),
        v [N, V + 68, 3] mesh condition (Next3D; ignored here), geometry: Next3D's
        mesh_geometry(v) made beforehand, or None (ignored here) -> dict(
            image       [N, 3, R, R] float32, roughly [-1, 1],
            image_raw   [N, 3, r, r] float32 in [-1, 1],
            image_depth [N, 1, r, r] float32, world units along the ray).
        noise_mode applies to the StyleGAN2 networks; SR uses rendering_kwargs['superresolution_noise_mode'].
        generator: torch.Generator (on G's device) for the renderer's random depth sampling, so
        that a seed gives the same image every time; None = torch's global generator.
        """
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim], 'ws')
        misc.assert_shape(c, [ws.shape[0], None], 'c')
        if c.shape[1] < 25:
            raise ValueError(f'c: the camera label needs 25 values (4x4 cam2world + 3x3 intrinsics), got {c.shape[1]}')
        nrr = self.neural_rendering_resolution if neural_rendering_resolution is None else int(neural_rendering_resolution)
        kwargs = dict(noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv, geometry=geometry)
        planes = self._planes(ws, v, update_emas, cache_backbone, use_cached_backbone, **kwargs)

        cam2world, intrinsics = coords.split_label(c)
        ray_origins, ray_directions = self.ray_sampler(cam2world, intrinsics, nrr)
        feature_samples, depth_samples, _ = self.renderer(planes, self.decoder, ray_origins, ray_directions, self.rendering_kwargs,
                                                          generator=generator)
        n = ws.shape[0]
        feature_image = feature_samples.permute(0, 2, 1).reshape(n, feature_samples.shape[-1], nrr, nrr).contiguous()
        depth_image = depth_samples.permute(0, 2, 1).reshape(n, 1, nrr, nrr)
        rgb_image = feature_image[:, :3]
        sr_image = self.superresolution(rgb_image, feature_image, ws[:, :self.num_backbone_ws],
                                        noise_mode=self.rendering_kwargs['superresolution_noise_mode'],
                                        force_fp32=force_fp32, fused_modconv=fused_modconv)
        return dict(image=sr_image, image_raw=rgb_image, image_depth=depth_image)

    def forward(self, z: torch.Tensor, c: torch.Tensor, v: Optional[torch.Tensor] = None, truncation_psi: float = 1,
                truncation_cutoff: Optional[int] = None, neural_rendering_resolution: Optional[int] = None,
                update_emas: bool = False, cache_backbone: bool = False, use_cached_backbone: bool = False,
                noise_mode: str = 'random', force_fp32: bool = False, fused_modconv=None,
                generator: Optional[torch.Generator] = None) -> dict:
        """mapping + synthesis; see those."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas)
        return self.synthesis(ws, c, v, neural_rendering_resolution=neural_rendering_resolution, update_emas=update_emas,
                              cache_backbone=cache_backbone, use_cached_backbone=use_cached_backbone,
                              noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv, generator=generator)

    # --- point queries (shapes, density regularisation) --------------------------------------
    def sample(self, coordinates: torch.Tensor, directions: torch.Tensor, z: torch.Tensor, c: torch.Tensor,
               v: Optional[torch.Tensor] = None, truncation_psi: float = 1, truncation_cutoff: Optional[int] = None,
               update_emas: bool = False, noise_mode: str = 'random', force_fp32: bool = False, fused_modconv=None) -> dict:
        """coordinates, directions [N, M, 3] world units -> dict(sigma [N, M, 1] raw density, rgb [N, M, 32])."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas)
        return self.sample_mixed(coordinates, directions, ws, v, update_emas=update_emas, noise_mode=noise_mode,
                                 force_fp32=force_fp32, fused_modconv=fused_modconv)

    def sample_mixed(self, coordinates: torch.Tensor, directions: torch.Tensor, ws: torch.Tensor,
                     v: Optional[torch.Tensor] = None, update_emas: bool = False, noise_mode: str = 'random',
                     force_fp32: bool = False, fused_modconv=None, geometry=None) -> dict:
        """Like `sample`, from ws [N, num_ws, w_dim] instead of z; geometry as in `synthesis`."""
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim], 'ws')
        planes = self.make_planes(ws, v, update_emas=update_emas, noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv,
                                  geometry=geometry)
        return self.renderer.run_model(planes, self.decoder, coordinates, directions, self.rendering_kwargs)

    def extra_repr(self):
        return (f'img_resolution={self.img_resolution}, plane_resolution={self.plane_resolution}, '
                f'neural_rendering_resolution={self.neural_rendering_resolution}, plane_axes={self.plane_axes!r}')
