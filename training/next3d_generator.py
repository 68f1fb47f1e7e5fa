"""Next3D's generator: a mesh-driven neural texture inside EG3D's tri-plane.

    ws = mapping(z, c)                         [N, 28, w_dim] at FFHQ (14 backbone + 14 texture)
    eg3d_ws, texture_ws = ws[:, :14], ws[:, 14:]
    texture = texture_backbone.synthesis(texture_ws)              [N, 32, 256, 256] UV space
    renders = rasterizer(mesh vertices, texture)                  front / side / top + alphas
    box = whole-pixel mouth box from the front-projected lip landmarks
    front = paste(front, mouth_backbone(crop(front, box) -> 64 x 64, eg3d_ws), box)   (training/mouth.py)
    front = neural_blending(front, eg3d_ws)
    planes = to_planes(renders) * alpha + static backbone planes * (1 - alpha)
    -> volume rendering + super-resolution (the last eg3d w), as EG3DGenerator

The mesh condition `v` is [N, V + 68, 3]: the posed mesh's V vertices then its 68 iBUG
landmarks, FLAME canonical space in metres with the global head rotation removed.

The mesh topology (faces, UVs, face/eye UV mask) lives in the rasterizer's buffers, so
checkpoints are self-contained; fill them once with `load_topology` after building a new
generator. Compatibility options for the official weights (new models keep the defaults):
    plane_axes   'next3d' | 'eg3d'       plane sampling axes (coords.PLANE_AXES)
    plane_layout 'aligned' | 'released'  renders on the planes with matching axes, or the
                                         released code's mismatched layout
    side_alpha   'or' | 'released'       side alpha = OR of both yaw views, or one view only

Official state-dict names: `backbone.*`, `texture_backbone.synthesis.*` and `superresolution.*`
match; `mouth_backbone.*` / `neural_blending.*` lack the official `synthesis.` level
(see training/style_unet.py); the topology buffers have different names and shapes.
"""

import math
from typing import Optional

import torch

from torch_utils import misc
from torch_utils import persistence
from training import mouth
from training.eg3d_generator import EG3DGenerator
from training.mesh.texture_planes import TexturePlaneRasterizer
from training.networks_stylegan2 import Generator as StyleGAN2Generator
from training.style_unet import StyleUNet

NUM_LANDMARKS = 68
MOUTH_DEFAULTS = dict(in_resolution=64, bottleneck_resolution=4)     # output: the plane resolution
BLENDING_DEFAULTS = dict(bottleneck_resolution=32)                   # input and output: the plane resolution


def num_synthesis_ws(resolution: int) -> int:
    """ws of a StyleGAN2 synthesis network at `resolution` (14 at 256)."""
    return 2 * int(math.log2(resolution)) - 2


@persistence.persistent_class
class Next3DGenerator(EG3DGenerator):
    """z [N, z_dim], c [N, >= 25], v [N, V + 68, 3] -> dict(image, image_raw, image_depth) (see EG3DGenerator)."""

    def __init__(self,
        z_dim: int = 512,               # Latent z dimensionality.
        c_dim: int = 25,                # Conditioning label dimensionality of the mapping (the camera: 25).
        w_dim: int = 512,               # Intermediate latent w dimensionality.
        img_resolution: int = 512,      # Output resolution R.
        img_channels: int = 3,          # Output channels.
        num_vertices: int = 5023,       # Mesh vertices V (FLAME: 5023).
        num_faces: int = 9976,          # Mesh faces (FLAME: 9976).
        num_uvs: int = 5118,            # Texture coordinates (FLAME: 5118).
        plane_resolution: int = 256,    # Tri-plane and render resolution P.
        plane_channels: int = 32,       # Channels per plane = neural texture channels.
        texture_resolution: int = 256,  # Neural texture resolution.
        neural_rendering_resolution: int = 64,   # Initial raw rendering resolution r.
        plane_axes: str = 'next3d',     # 'next3d' | 'eg3d', see the module docstring.
        plane_layout: str = 'aligned',  # 'aligned' | 'released'.
        side_alpha: str = 'or',         # 'or' | 'released'.
        mouth_kwargs: dict = None,      # StyleUNet overrides of the mouth net (in_resolution 64, bottleneck_resolution 4, ...).
        blending_kwargs: dict = None,   # StyleUNet overrides of the blending net (bottleneck_resolution 32, ...).
        mapping_kwargs: dict = None,    # MappingNetwork arguments (num_layers, ...).
        synthesis_kwargs: dict = None,  # Arguments shared by the four StyleGAN2 networks (channel_base, num_fp16_res, ...).
        sr_kwargs: dict = None,         # SuperResolution arguments.
        decoder_kwargs: dict = None,    # OSGDecoder arguments.
        rendering_kwargs: dict = None,  # Overrides of eg3d_generator.DEFAULT_RENDERING_KWARGS.
    ):
        super().__init__(
            z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
            plane_resolution=plane_resolution, plane_channels=plane_channels,
            neural_rendering_resolution=neural_rendering_resolution, plane_axes=plane_axes,
            mapping_kwargs=mapping_kwargs, synthesis_kwargs=synthesis_kwargs, sr_kwargs=sr_kwargs,
            decoder_kwargs=decoder_kwargs, rendering_kwargs=rendering_kwargs,
            mapping_ws=num_synthesis_ws(plane_resolution) + num_synthesis_ws(texture_resolution))
        self.num_vertices = int(num_vertices)
        self.texture_resolution = texture_resolution
        self.plane_layout = plane_layout
        self.side_alpha = side_alpha
        self.topology_loaded = False
        synthesis_kwargs = dict(synthesis_kwargs or {})

        self.texture_backbone = StyleGAN2Generator(z_dim, c_dim, w_dim, img_resolution=texture_resolution, img_channels=plane_channels,
                                                   with_mapping=False, synthesis_kwargs=synthesis_kwargs)
        unet_common = {k: synthesis_kwargs[k] for k in ('channel_base', 'channel_max', 'num_fp16_res', 'mixed_precision',
                                                        'conv_clamp', 'fused_modconv_default', 'use_noise') if k in synthesis_kwargs}
        self.mouth_backbone = StyleUNet(**{**dict(in_channels=plane_channels, out_channels=plane_channels, w_dim=w_dim,
                                                  out_resolution=plane_resolution), **MOUTH_DEFAULTS, **unet_common, **(mouth_kwargs or {})})
        self.neural_blending = StyleUNet(**{**dict(in_channels=plane_channels, out_channels=plane_channels, w_dim=w_dim,
                                                   in_resolution=plane_resolution, out_resolution=plane_resolution),
                                            **BLENDING_DEFAULTS, **unet_common, **(blending_kwargs or {})})
        for name, net in (('mouth_kwargs', self.mouth_backbone), ('blending_kwargs', self.neural_blending)):
            if net.num_ws != self.num_backbone_ws:
                raise ValueError(f'Next3DGenerator: {name}: out_resolution must be the plane resolution ({plane_resolution}) '
                                 f'so that the net reads the backbone ws, got {net.out_resolution}')
        if self.neural_blending.in_resolution != plane_resolution:
            raise ValueError(f'Next3DGenerator: blending_kwargs: in_resolution must be the plane resolution ({plane_resolution})')
        self.rasterizer = TexturePlaneRasterizer(num_faces=num_faces, num_uvs=num_uvs, image_size=plane_resolution,
                                                 layout=plane_layout, side_alpha=side_alpha, plane_axes=plane_axes)

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.neural_rendering_resolution, int(self.topology_loaded)], dtype=torch.int64)

    def set_extra_state(self, state):
        self.neural_rendering_resolution, self.topology_loaded = int(state[0]), bool(state[1])

    def split_condition(self, v: torch.Tensor, batch_size: int):
        """v [N, V + 68, 3] -> vertices [N, V, 3], landmarks [N, 68, 3]."""
        if v is None:
            raise ValueError('Next3DGenerator needs the mesh condition v [N, V + 68, 3] (vertices then 68 landmarks)')
        misc.assert_shape(v, [batch_size, self.num_vertices + NUM_LANDMARKS, 3], 'v (mesh vertices + 68 landmarks)')
        return v[:, :self.num_vertices], v[:, self.num_vertices:]

    def mesh_geometry(self, v: torch.Tensor):
        """The rasterizer's ViewGeometry of the mesh condition v [N, V + 68, 3]: what `geometry`
        of make_planes / synthesis / sample_mixed takes, made beforehand (no weights involved)."""
        return self.rasterizer.geometry(self.split_condition(v, len(v))[0])

    def refine_front(self, front: torch.Tensor, landmarks: torch.Tensor, eg3d_ws: torch.Tensor, **kwargs) -> torch.Tensor:
        """Mouth synthesis at the lip box, then neural blending of the whole front render.

        front [N, C, P, P], landmarks [N, 68, 3] mesh metres, eg3d_ws [N, 14, w_dim] -> [N, C, P, P].
        """
        box = mouth.mouth_box_from_landmarks(self.rasterizer.project_landmarks_front(landmarks), image_size=self.plane_resolution)
        patch = mouth.crop_mouth(front, box, out_size=self.mouth_backbone.in_resolution)
        # The paste's backward is written contiguously: the mouth net's channels-last output
        # layers would run their backward in the other layout.
        mouth_image = misc.keep_gradient_layout(self.mouth_backbone(patch, eg3d_ws, **kwargs))
        front = mouth.paste_mouth(front, mouth_image, box)
        return self.neural_blending(front, eg3d_ws, **kwargs)

    def make_planes(self, ws: torch.Tensor, v: Optional[torch.Tensor], update_emas: bool = False, noise_mode: str = 'random',
                    force_fp32: bool = False, fused_modconv=None, geometry=None) -> torch.Tensor:
        """ws [N, num_ws, w_dim], v [N, V + 68, 3] -> tri-plane [N, 3, plane_channels, P, P] float32.
        geometry: self.mesh_geometry(v) made beforehand (the same planes), or None."""
        if not self.topology_loaded:
            raise RuntimeError('Next3DGenerator: the mesh topology is not loaded: call '
                               'training.next3d_generator.load_topology(G, template_obj, uv_mask) after building it '
                               '(an official Next3D pickle without its face/eye UV mask: pass uv_mask_path to '
                               'legacy.load_network_pkl)')
        verts, landmarks = self.split_condition(v, ws.shape[0])
        kwargs = dict(noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv)
        eg3d_ws, texture_ws = ws[:, :self.num_backbone_ws], ws[:, self.num_backbone_ws:]
        texture = self.texture_backbone.synthesis(texture_ws, update_emas=update_emas, **kwargs)
        r = self.rasterizer(verts, texture, geometry)
        front = self.refine_front(r['front'], landmarks, eg3d_ws, **kwargs)
        static = super().make_planes(ws, None, update_emas=update_emas, **kwargs)
        rendered = self.rasterizer.plane_images(front, r['side'], r['top'])
        alpha = self.rasterizer.plane_images(r['front_alpha'], r['side_alpha'], r['top_alpha'])
        return blend_planes(static, rendered, alpha)

    def extra_repr(self):
        return (super().extra_repr() + f', num_vertices={self.num_vertices}, texture_resolution={self.texture_resolution}, '
                f'plane_layout={self.plane_layout!r}, side_alpha={self.side_alpha!r}')


def blend_planes(static: torch.Tensor, rendered, alpha) -> torch.Tensor:
    """Next3D's planes: rendered * alpha + static * (1 - alpha), one pass.

    static (N, 3, C, P, P), a tensor of the caller's that may be overwritten; rendered and
    alpha: three (N, C, P, P) and three (N, 1, P, P), one per plane -> (N, 3, C, P, P).
    Without a graph to record, in eager mode, plane by plane into `static` (the renders are
    not stacked); otherwise (and under torch.compile, which cannot trace the strided out=)
    stacked, with the alphas laid out like the planes: pixel by pixel when their channels
    are innermost (channels-last convolutions, the CPU's), so that the blend and its
    backward broadcast them along contiguous channels. The same values either way."""
    if misc.records_graph(static, *rendered, *alpha) or torch.compiler.is_compiling():
        alphas = torch.stack(alpha, dim=-1).permute(0, 4, 1, 2, 3) if static.stride(2) == 1 else torch.stack(alpha, dim=1)
        return torch.lerp(static, torch.stack(rendered, dim=1), alphas)
    for p in range(static.shape[1]):
        torch.lerp(static[:, p], rendered[p], alpha[p], out=static[:, p])
    return static


def load_topology(G: Next3DGenerator, template_obj_path: str, uv_mask_path: Optional[str] = None) -> Next3DGenerator:
    """Fill G's topology buffers from a template OBJ (v, vt, f with v/vt indices) and a face/eye
    UV mask image (white = texture may override the static planes; None = everywhere).

    The OBJ must have G.num_vertices vertices and the face / texture-coordinate counts G was
    built with. Returns G. Needed once per new model; checkpoints carry the buffers.
    """
    from training.mesh.head_model import load_template, load_uv_mask
    from training.mesh.obj_io import read_obj_vertices
    faces, uvcoords, uvfaces = load_template(template_obj_path)
    found = dict(vertices=len(read_obj_vertices(template_obj_path)), faces=len(faces), uvs=len(uvcoords))
    expected = dict(vertices=G.num_vertices, faces=G.rasterizer.num_faces, uvs=G.rasterizer.num_uvs)
    if found != expected:
        raise ValueError(f'{template_obj_path}: topology {found} does not match the generator ({expected})')
    mask = None if uv_mask_path is None else load_uv_mask(uv_mask_path, size=None)
    with torch.no_grad():
        G.rasterizer.load_topology(faces, uvfaces, uvcoords, mask)
    G.topology_loaded = True
    return G
