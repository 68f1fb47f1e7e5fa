"""A mesh-driven 3D Gaussian generator (GGHead-style), with Next3DGenerator's interface.

    ws = mapping(z, c)                                  [N, num_ws, w_dim]
    uv = uv_synthesis(ws)                               [N, 11 + C, U, U]  per-texel Gaussian attributes
    mouth = mouth_synthesis(ws[:, :m])                  [N, 11 + C, M, M]  the mouth pocket's (below)
    Gaussians = rasterizer.make_gaussians(posed mesh v, uv, mouth)
    features, alpha, depth = splat(Gaussians, camera c) at the rendering resolution r
    image = features over background_synthesis(ws[:, :b])   (image space, upsampled to r)
    -> optional super-resolution (EG3D's, the last w) when r < img_resolution

One Gaussian per texel of a U x U grid in the template's UV space (texels that no UV face
covers carry none). Its anchor is the surface point under the texel: the texel centre's
barycentric coordinates in its UV face, computed once from the template
(`load_topology`), applied to the *posed* mesh v, so expression, jaw and eyes move the
Gaussians by construction. The network's attributes per texel (channels in this order):
    offset (3)    along the posed face's (tangent, bitangent, normal), x offset_gain world units;
                  the tangent follows the texture's u axis, the normal points out of the head
    log-scale (3) x scale_gain, relative to base_scale x the texel spacing on the posed surface
    rotation (4)  quaternion (w, x, y, z) relative to that face frame (identity at 0)
    opacity (1)   sigmoid(x + opacity_bias)
    features (C)  sigmoid(x) x 1.002 - 0.001 (EG3D's activation); the first 3 are RGB
Images are in [-1, 1] (features x 2 - 1, as EG3D's renderer). image_depth is the expected
distance along each pixel's ray (world units, as EG3DGenerator's), with the background at
rendering_kwargs['ray_end'].

The mouth interior. The bundled head model (and FLAME) have no surface inside the mouth,
only an opening: the lips' boundary loop, which opens with the jaw. `load_topology` finds
it (the boundary loops of the template other than the longest, the neck: the lowest one)
and a pocket is built behind it on the posed mesh: for M points around the lips L_j and M
rings rho in (0, 1), P = L_j + rho (centre - L_j) - mouth_depth sin(pi rho / 2) forward, a
bowl that opens and closes with the lips. Its M x M Gaussians come from a small StyleGAN2
synthesis of their own (Next3D's idea of a dedicated mouth network, in 3D): the lips drive
where they are, the network what they look like (teeth, tongue, shadow). With the mouth
closed the bowl is a sheet behind the lips, hidden by them.

The background is an image-space StyleGAN2 synthesis at a low resolution (the synthetic
data's smooth colour fields; hair, neck and shoulders must be Gaussians near the mesh).

Differences from GGHead: our own UV layout/anchoring on any FLAME-format template, the
mouth pocket, and EG3D's dual discriminator, loss and schedules unchanged (train.py).
"""

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import misc
from torch_utils import persistence
from training import coords
from training import gaussian_rasterizer as gr
from training.eg3d_generator import make_rendering_kwargs
from training.mesh.rasterize import rasterize
from training.networks_stylegan2 import Generator as StyleGAN2Generator
from training.networks_stylegan2 import SynthesisNetwork
from training.superresolution import SuperResolution
from training.superresolution import sr_factor
from training.volumetric_rendering.ray_sampler import RaySampler

NUM_LANDMARKS = 68
GEOMETRY_CHANNELS = 11              # offset 3 + log-scale 3 + rotation 4 + opacity 1
MIN_SCALE = 1e-5                    # world units: the smallest standard deviation of a Gaussian
DEFAULT_GAUSSIAN_KWARGS = dict(
    offset_gain=0.01,               # world units of offset per unit of network output (outputs start at ~1)
    base_scale=0.5,                 # standard deviation at log-scale 0 / texel spacing on the posed surface
    scale_gain=0.5,                 # log-scale per unit of network output
    log_scale_range=(-4.0, 1.5),    # clamp of that log-scale
    rotation_gain=0.3,              # quaternion units per unit of network output
    opacity_bias=2.0,               # initial opacity about sigmoid(2) = 0.88
    mouth_depth=0.03,               # metres: depth of the mouth pocket behind the lips
    backend='auto',                 # Gaussian rasterizer backend: 'auto' | 'pytorch' | 'gsplat'
)


def make_gaussian_kwargs(**overrides) -> dict:
    """DEFAULT_GAUSSIAN_KWARGS with `overrides` (unknown keys are an error)."""
    unknown = sorted(set(overrides) - set(DEFAULT_GAUSSIAN_KWARGS))
    if unknown:
        raise ValueError(f'unknown gaussian_kwargs {unknown}; known: {sorted(DEFAULT_GAUSSIAN_KWARGS)}')
    out = dict(DEFAULT_GAUSSIAN_KWARGS, **overrides)
    if out['backend'] not in gr.BACKENDS:
        raise ValueError(f"gaussian_kwargs.backend must be one of {gr.BACKENDS}, got {out['backend']!r}")
    out['log_scale_range'] = tuple(float(x) for x in out['log_scale_range'])
    return out


def _face_frames(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, tangent_coef: torch.Tensor):
    """Orthonormal frames (..., 3, 3) with columns (tangent, bitangent, normal) of triangles
    p0, p1, p2 (..., 3), and their areas (...). tangent = coef0 e1 + coef1 e2 made
    orthogonal to the normal (e1 = p1 - p0, e2 = p2 - p0)."""
    e1, e2 = p1 - p0, p2 - p0
    cross = torch.cross(e1, e2, dim=-1)
    area = cross.norm(dim=-1) / 2
    normal = cross / (2 * area).clamp(min=1e-12).unsqueeze(-1)
    tangent = tangent_coef[..., :1] * e1 + tangent_coef[..., 1:] * e2
    tangent = F.normalize(tangent - (tangent * normal).sum(-1, keepdim=True) * normal, dim=-1, eps=1e-12)
    bitangent = torch.cross(normal, tangent, dim=-1)
    return torch.stack([tangent, bitangent, normal], dim=-1), area


@persistence.persistent_class
class GaussianMeshRasterizer(torch.nn.Module):
    """Template topology and UV anchors; posed mesh + attribute maps -> Gaussians -> images.

    Buffers (filled by `load_topology`): faces, uvfaces (F, 3), uvcoords (T, 2) v up,
    uv_mask (1, 1, S, S) (the face/eye region; used by metrics, not for rendering),
    texel_face (U*U,) the face under each texel or -1, texel_bary (U*U, 3), face_tangent
    (F, 2), face_uv_area (F,), mouth_edge (M, 2) / mouth_t (M,) / mouth_face (M,): the lips'
    loop resampled at M points (lerp between two vertices) and the face along each.
    """

    def __init__(self,
        num_faces: int,                 # Faces of the template mesh.
        num_uvs: int,                   # Texture coordinates of the template.
        uv_resolution: int,             # U: Gaussians on a U x U grid in UV space.
        mouth_resolution: int,          # M: the mouth pocket's M x M Gaussians.
        mask_size: int = 256,           # Resolution of the face/eye UV mask buffer.
    ):
        super().__init__()
        self.num_faces, self.num_uvs = int(num_faces), int(num_uvs)
        self.uv_resolution, self.mouth_resolution = int(uv_resolution), int(mouth_resolution)
        u2, m = self.uv_resolution ** 2, self.mouth_resolution
        self.register_buffer('faces', torch.zeros(self.num_faces, 3, dtype=torch.int64))
        self.register_buffer('uvfaces', torch.zeros(self.num_faces, 3, dtype=torch.int64))
        self.register_buffer('uvcoords', torch.zeros(self.num_uvs, 2))
        self.register_buffer('uv_mask', torch.ones(1, 1, mask_size, mask_size))
        self.register_buffer('texel_face', torch.full((u2,), -1, dtype=torch.int64))
        self.register_buffer('texel_bary', torch.zeros(u2, 3))
        self.register_buffer('face_tangent', torch.zeros(self.num_faces, 2))
        self.register_buffer('face_uv_area', torch.ones(self.num_faces))
        self.register_buffer('mouth_edge', torch.zeros(m, 2, dtype=torch.int64))
        self.register_buffer('mouth_t', torch.zeros(m))
        self.register_buffer('mouth_face', torch.zeros(m, dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f'num_faces={self.num_faces}, num_uvs={self.num_uvs}, uv_resolution={self.uv_resolution}, '
                f'mouth_resolution={self.mouth_resolution}')

    @property
    def num_gaussians(self) -> int:
        return self.uv_resolution ** 2 + self.mouth_resolution ** 2

    # --- topology ------------------------------------------------------------------------

    def load_topology(self, faces, uvfaces, uvcoords, template_verts, uv_mask=None, source: str = 'template'):
        """Fill the buffers from the template: faces / uvfaces (F, 3), uvcoords (T, 2) in [0, 1]
        (v up), template_verts (V, 3) mesh metres (to find the mouth), uv_mask (H, W) or None."""
        faces, uvfaces = torch.as_tensor(np.asarray(faces)).long(), torch.as_tensor(np.asarray(uvfaces)).long()
        uvcoords = torch.as_tensor(np.asarray(uvcoords), dtype=torch.float32)
        verts = torch.as_tensor(np.asarray(template_verts), dtype=torch.float64)
        for name, t, shape in (('faces', faces, (self.num_faces, 3)), ('uvfaces', uvfaces, (self.num_faces, 3)),
                               ('uvcoords', uvcoords, (self.num_uvs, 2))):
            if tuple(t.shape) != shape:
                raise ValueError(f'{source}: {name}: expected shape {shape}, got {tuple(t.shape)}')
        if int(uvfaces.min()) < 0 or int(uvfaces.max()) >= self.num_uvs or int(faces.min()) < 0 or int(faces.max()) >= len(verts):
            raise ValueError(f'{source}: face indices outside the vertices or texture coordinates')
        self.faces.copy_(faces)
        self.uvfaces.copy_(uvfaces)
        self.uvcoords.copy_(uvcoords)
        if uv_mask is not None:
            mask = torch.as_tensor(np.asarray(uv_mask), dtype=torch.float32)
            mask = mask.reshape(1, 1, *mask.shape[-2:])
            self.uv_mask.copy_(F.interpolate(mask, size=self.uv_mask.shape[-2:], mode='nearest').clamp(0, 1))

        # Texel anchors: rasterize the UV layout (NDC x = 2u - 1, y = 1 - 2v: image row 0 is v = 1).
        uv = uvcoords.double()
        uv_ndc = torch.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2, torch.zeros_like(uv[:, 0])], dim=-1)
        frag = rasterize(uv_ndc[None], uvfaces, self.uv_resolution, cull_backfaces=False, backend='pytorch')
        if not (frag.pix_to_face >= 0).any():
            raise ValueError(f'{source}: no texel of a {self.uv_resolution}x{self.uv_resolution} grid lies inside a UV face')
        self.texel_face.copy_(frag.pix_to_face.reshape(-1))
        self.texel_bary.copy_(frag.bary.reshape(-1, 3).float())

        # Per face: the tangent along u as a combination of the edges, and the UV area.
        c0, c1, c2 = uv[uvfaces].unbind(1)
        (du1, dv1), (du2, dv2) = (c1 - c0).unbind(-1), (c2 - c0).unbind(-1)
        det = du1 * dv2 - du2 * dv1
        coef = torch.stack([dv2, -dv1], dim=-1) * torch.sign(det)[:, None]
        degenerate = det.abs() < 1e-12
        coef[degenerate] = torch.tensor([1.0, 0.0], dtype=coef.dtype)
        self.face_tangent.copy_(coef.float())
        self.face_uv_area.copy_((det.abs() / 2).clamp(min=1e-10).float())

        edge, t, face = mouth_loop_samples(faces, verts, self.mouth_resolution, source)
        self.mouth_edge.copy_(edge)
        self.mouth_t.copy_(t)
        self.mouth_face.copy_(face)
        return self

    # --- Gaussians -------------------------------------------------------------------------

    def make_gaussians(self, verts: torch.Tensor, uv_attrs: torch.Tensor, mouth_attrs: torch.Tensor, opts: dict) -> dict:
        """Posed mesh verts (B, V, 3) mesh metres, attribute maps (B, 11 + C, U, U) and
        (B, 11 + C, M, M) -> dict(means (B, N, 3) world, covariances (B, N, 3, 3),
        opacities (B, N), features (B, N, C)); N = U^2 + M^2, texels without surface have
        opacity 0."""
        world = coords.mesh_to_world(verts.float())
        bsz = world.shape[0]
        # UV texels: anchors and frames on the posed faces.
        face = self.texel_face.clamp(min=0)
        corners = world[:, self.faces[face]]                                     # (B, U^2, 3, 3)
        anchor = (self.texel_bary[None, :, :, None] * corners).sum(2)
        frame, area = _face_frames(corners[:, :, 0], corners[:, :, 1], corners[:, :, 2], self.face_tangent[face])
        spacing = torch.sqrt(area / self.face_uv_area[face]) / self.uv_resolution
        uv_valid = (self.texel_face >= 0).expand(bsz, -1)
        # Mouth pocket.
        m = self.mouth_resolution
        lips = torch.lerp(world[:, self.mouth_edge[:, 0]], world[:, self.mouth_edge[:, 1]], self.mouth_t[None, :, None])   # (B, M, 3)
        fc = world[:, self.faces[self.mouth_face]]
        forward = F.normalize(torch.cross(fc[:, :, 1] - fc[:, :, 0], fc[:, :, 2] - fc[:, :, 0], dim=-1).sum(1), dim=-1)   # (B, 3)
        centre = lips.mean(1, keepdim=True)
        rho = (torch.arange(m, device=world.device, dtype=world.dtype) + 0.5) / m
        depth = opts['mouth_depth'] * coords.MESH_TO_WORLD_SCALE * torch.sin(rho * math.pi / 2)
        pocket = (lips[:, None] + rho[None, :, None, None] * (centre[:, None] - lips[:, None])
                  - depth[None, :, None, None] * forward[:, None, None]).reshape(bsz, m * m, 3)   # (B, ring, column) flattened
        along = F.normalize(torch.roll(lips, -1, 1) - torch.roll(lips, 1, 1), dim=-1, eps=1e-12)
        along = F.normalize(along - (along * forward[:, None]).sum(-1, keepdim=True) * forward[:, None], dim=-1, eps=1e-12)
        pocket_frame = torch.stack([along, torch.cross(forward[:, None].expand_as(along), along, dim=-1),
                                    forward[:, None].expand_as(along)], dim=-1)                  # (B, M, 3, 3)
        pocket_frame = pocket_frame[:, None].expand(bsz, m, m, 3, 3).reshape(bsz, m * m, 3, 3)
        perimeter = (torch.roll(lips, -1, 1) - lips).norm(dim=-1).sum(1, keepdim=True)          # (B, 1)
        pocket_spacing = (perimeter / m).expand(bsz, m * m)

        anchor = torch.cat([anchor, pocket], dim=1)
        frame = torch.cat([frame, pocket_frame], dim=1)
        with torch.no_grad():
            proper = torch.linalg.det(frame) > 0.5                              # degenerate faces: no frame
        frame = torch.where(proper[..., None, None], frame, torch.eye(3, device=frame.device, dtype=frame.dtype))
        spacing = torch.cat([spacing, pocket_spacing], dim=1)
        valid = torch.cat([uv_valid, torch.ones_like(uv_valid[:, :1]).expand(bsz, m * m)], dim=1)
        attrs = torch.cat([uv_attrs.flatten(2), mouth_attrs.flatten(2)], dim=2).transpose(1, 2).float()   # (B, N, 11 + C)
        offset, log_scale, rot, opacity, feats = attrs.split([3, 3, 4, 1, attrs.shape[-1] - GEOMETRY_CHANNELS], dim=-1)

        means = anchor + (frame @ (offset * opts['offset_gain']).unsqueeze(-1)).squeeze(-1)
        lo, hi = opts['log_scale_range']
        scales = opts['base_scale'] * spacing.unsqueeze(-1) * torch.exp((log_scale * opts['scale_gain']).clamp(lo, hi))
        scales = scales.clamp(min=MIN_SCALE)                # zero-area faces of a collapsed mesh: no singular Gaussians
        quat = rot * opts['rotation_gain'] + rot.new_tensor([1.0, 0.0, 0.0, 0.0])
        covariances = gr.covariance_from_scale_rotation(scales, frame @ gr.quaternion_to_matrix(quat))
        opacities = torch.sigmoid(opacity.squeeze(-1) + opts['opacity_bias']) * valid
        features = torch.sigmoid(feats) * (1 + 2 * 0.001) - 0.001
        return dict(means=means, covariances=covariances, opacities=opacities, features=features)


def mouth_loop_samples(faces: torch.Tensor, verts: torch.Tensor, count: int, source: str = 'template'):
    """The mouth opening of a template: its boundary loop resampled at `count` points.

    Boundary half-edges (a -> b with no b -> a) form loops; the longest is the neck cut, and
    of the others the lowest (smallest mean y) is the mouth (FLAME also has the eyes').
    Points are spaced evenly by arc length on the template, starting at the loop's vertex of
    largest x (a mouth corner), in the loop's direction. Returns (edge (count, 2) int64
    vertex ids, t (count,) float32 lerp weights, face (count,) int64 face of each edge).
    """
    half = {}
    for f, tri in enumerate(faces.tolist()):
        for k in range(3):
            half[(tri[k], tri[(k + 1) % 3])] = f
    boundary = {a: (b, f) for (a, b), f in half.items() if (b, a) not in half}
    loops, seen = [], set()
    for start in boundary:
        if start in seen:
            continue
        loop, v = [], start
        while v not in seen and v in boundary:
            seen.add(v)
            loop.append(v)
            v = boundary[v][0]
        if v == start and len(loop) >= 3:
            loops.append(loop)
    perimeter = lambda loop: float((verts[loop] - verts[loop[1:] + loop[:1]]).norm(dim=-1).sum())
    loops.sort(key=perimeter)
    candidates = loops[:-1]
    if not candidates:
        raise ValueError(f'{source}: no mouth opening found (a boundary loop of the mesh besides the neck)')
    loop = min(candidates, key=lambda lp: float(verts[lp, 1].mean()))
    first = int(torch.argmax(verts[loop, 0]))
    loop = loop[first:] + loop[:first]
    nxt = loop[1:] + loop[:1]
    seg = (verts[loop] - verts[nxt]).norm(dim=-1)
    ends = torch.cumsum(seg, 0)
    targets = (torch.arange(count, dtype=torch.float64) + 0.5) / count * ends[-1]
    idx = torch.searchsorted(ends, targets, right=True).clamp(max=len(loop) - 1)
    t = (targets - (ends[idx] - seg[idx])) / seg[idx].clamp(min=1e-12)
    edge = torch.tensor([[loop[i], nxt[i]] for i in idx.tolist()], dtype=torch.int64)
    face = torch.tensor([boundary[loop[i]][1] for i in idx.tolist()], dtype=torch.int64)
    return edge, t.clamp(0, 1).float(), face


@persistence.persistent_class
class GaussianGenerator(torch.nn.Module):
    """z [N, z_dim], c [N, >= 25], v [N, V + 68, 3] -> dict(image [N, 3, R, R], image_raw [N, 3, r, r],
    image_depth [N, 1, r, r]); the interface of Next3DGenerator."""

    def __init__(self,
        z_dim: int = 512,               # Latent z dimensionality.
        c_dim: int = 25,                # Conditioning label dimensionality of the mapping (the camera: 25).
        w_dim: int = 512,               # Intermediate latent w dimensionality.
        img_resolution: int = 512,      # Output resolution R.
        img_channels: int = 3,          # Output channels.
        num_vertices: int = 5023,       # Mesh vertices V (FLAME: 5023).
        num_faces: int = 9976,          # Mesh faces (FLAME: 9976).
        num_uvs: int = 5118,            # Texture coordinates (FLAME: 5118).
        uv_resolution: int = 256,       # U: one Gaussian per texel of a U x U grid in UV space.
        mouth_resolution: int = 32,     # M: the mouth pocket's M x M Gaussians.
        background_resolution: int = 64,   # Resolution of the image-space background synthesis.
        feature_channels: int = 3,      # C: features per Gaussian, first 3 = RGB (EG3D's 32 with super-resolution).
        neural_rendering_resolution: int = 512,  # Splatting resolution r; < R adds super-resolution.
        mapping_kwargs: dict = None,    # MappingNetwork arguments (num_layers, ...).
        synthesis_kwargs: dict = None,  # Arguments of the three StyleGAN2 synthesis networks (channel_base, ...).
        sr_kwargs: dict = None,         # SuperResolution arguments (used only when r < R).
        gaussian_kwargs: dict = None,   # Overrides of DEFAULT_GAUSSIAN_KWARGS.
        rendering_kwargs: dict = None,  # Overrides of eg3d_generator.DEFAULT_RENDERING_KWARGS (camera, c_scale, ...).
    ):
        super().__init__()
        if feature_channels < 3:
            raise ValueError(f'GaussianGenerator: feature_channels must be at least 3 (RGB), got {feature_channels}')
        if not (mouth_resolution <= uv_resolution and background_resolution <= uv_resolution):
            raise ValueError('GaussianGenerator: mouth_resolution and background_resolution must not exceed uv_resolution '
                             '(their networks read the first ws)')
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.num_vertices = int(num_vertices)
        self.feature_channels = feature_channels
        self.rendering_kwargs = make_rendering_kwargs(**(rendering_kwargs or {}))
        self.gaussian_kwargs = make_gaussian_kwargs(**(gaussian_kwargs or {}))
        self.neural_rendering_resolution = int(neural_rendering_resolution)
        self.topology_loaded = False
        synthesis_kwargs = dict(synthesis_kwargs or {})
        attr_channels = GEOMETRY_CHANNELS + feature_channels

        self.backbone = StyleGAN2Generator(z_dim, c_dim, w_dim, img_resolution=uv_resolution, img_channels=attr_channels,
                                           mapping_kwargs=mapping_kwargs, synthesis_kwargs=synthesis_kwargs)
        self.num_ws = self.backbone.num_ws
        self.mouth_synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=mouth_resolution, img_channels=attr_channels, **synthesis_kwargs)
        self.background_synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=background_resolution, img_channels=feature_channels,
                                                     **synthesis_kwargs)
        self.rasterizer = GaussianMeshRasterizer(num_faces=num_faces, num_uvs=num_uvs, uv_resolution=uv_resolution,
                                                 mouth_resolution=mouth_resolution)
        self.ray_sampler = RaySampler()
        self.superresolution = None
        if self.neural_rendering_resolution != img_resolution:
            self.superresolution = SuperResolution(
                channels=feature_channels, img_resolution=img_resolution, w_dim=w_dim,
                factor=sr_factor(img_resolution, self.neural_rendering_resolution),
                antialias=self.rendering_kwargs['sr_antialias'], img_channels=img_channels, **(sr_kwargs or {}))
        self._last_gaussians = None

    # --- checkpointed plain state --------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.neural_rendering_resolution, int(self.topology_loaded)], dtype=torch.int64)

    def set_extra_state(self, state):
        self.neural_rendering_resolution, self.topology_loaded = int(state[0]), bool(state[1])

    # --- latent mapping ------------------------------------------------------------------
    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1, truncation_cutoff: Optional[int] = None,
                update_emas: bool = False) -> torch.Tensor:
        """z [N, z_dim], c [N, >= 25] -> ws [N, num_ws, w_dim] float32 (as EG3DGenerator.mapping)."""
        rk = self.rendering_kwargs
        c = c[:, :self.c_dim]
        if rk['c_gen_conditioning_zero']:
            c = torch.zeros_like(c)
        return self.backbone.mapping(z, c * rk['c_scale'], truncation_psi=truncation_psi,
                                     truncation_cutoff=truncation_cutoff, update_emas=update_emas)

    # --- Gaussians -----------------------------------------------------------------------
    def split_condition(self, v: torch.Tensor, batch_size: int):
        """v [N, V + 68, 3] -> vertices [N, V, 3] (the landmarks are not used)."""
        if v is None:
            raise ValueError('GaussianGenerator needs the mesh condition v [N, V + 68, 3] (vertices then 68 landmarks)')
        misc.assert_shape(v, [batch_size, self.num_vertices + NUM_LANDMARKS, 3], 'v (mesh vertices + 68 landmarks)')
        return v[:, :self.num_vertices]

    def make_gaussians(self, ws: torch.Tensor, v: Optional[torch.Tensor], update_emas: bool = False, noise_mode: str = 'random',
                       force_fp32: bool = False, fused_modconv=None) -> dict:
        """ws [N, num_ws, w_dim], v [N, V + 68, 3] -> dict(means, covariances, opacities, features), see
        GaussianMeshRasterizer.make_gaussians."""
        if not self.topology_loaded:
            raise RuntimeError('GaussianGenerator: the mesh topology is not loaded: call '
                               'training.gaussian_generator.load_topology(G, template_obj) after building it')
        verts = self.split_condition(v, ws.shape[0])
        kwargs = dict(noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv)
        uv = self.backbone.synthesis(ws, update_emas=update_emas, **kwargs)
        mouth = self.mouth_synthesis(ws[:, :self.mouth_synthesis.num_ws], update_emas=update_emas, **kwargs)
        return self.rasterizer.make_gaussians(verts, uv, mouth, self.gaussian_kwargs)

    def _gaussians(self, ws, v, update_emas, cache_backbone, use_cached_backbone, **kwargs) -> dict:
        if use_cached_backbone and self._last_gaussians is not None:
            gaussians = self._last_gaussians
        else:
            gaussians = self.make_gaussians(ws, v, update_emas=update_emas, **kwargs)
        if cache_backbone:
            self._last_gaussians = gaussians
        return gaussians

    # --- image synthesis -----------------------------------------------------------------
    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, v: Optional[torch.Tensor] = None,
                  neural_rendering_resolution: Optional[int] = None, update_emas: bool = False,
                  cache_backbone: bool = False, use_cached_backbone: bool = False,
                  noise_mode: str = 'random', force_fp32: bool = False, fused_modconv=None,
                  generator: Optional[torch.Generator] = None) -> dict:
        """ws [N, num_ws, w_dim], camera c [N, >= 25], mesh condition v [N, V + 68, 3] -> dict(
            image       [N, 3, R, R] float32, roughly [-1, 1],
            image_raw   [N, 3, r, r] float32 in [-1, 1],
            image_depth [N, 1, r, r] float32, world units along the ray).
        Splatting is deterministic: `generator` is accepted for the interface and unused."""
        del generator
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim], 'ws')
        misc.assert_shape(c, [ws.shape[0], None], 'c')
        if c.shape[1] < 25:
            raise ValueError(f'c: the camera label needs 25 values (4x4 cam2world + 3x3 intrinsics), got {c.shape[1]}')
        nrr = self.neural_rendering_resolution if neural_rendering_resolution is None else int(neural_rendering_resolution)
        kwargs = dict(noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv)
        g = self._gaussians(ws, v, update_emas, cache_backbone, use_cached_backbone, **kwargs)
        background = self.background_synthesis(ws[:, :self.background_synthesis.num_ws], update_emas=update_emas, **kwargs)
        background = torch.sigmoid(background) * (1 + 2 * 0.001) - 0.001
        if background.shape[-1] != nrr:
            background = F.interpolate(background, size=(nrr, nrr), mode='bilinear', align_corners=False,
                                       antialias=background.shape[-1] > nrr)
        camera = c[:, :25].float()
        out = gr.rasterize_gaussians(g['means'], g['covariances'], g['opacities'], g['features'], camera, nrr, background,
                                     backend=self.gaussian_kwargs['backend'])
        feature_image = out.features * 2 - 1
        rgb_image = feature_image[:, :3]
        depth_image = self.ray_depth(out.depth, out.alpha, camera)
        if self.superresolution is not None:
            image = self.superresolution(rgb_image, feature_image, ws, noise_mode=self.rendering_kwargs['superresolution_noise_mode'],
                                         force_fp32=force_fp32, fused_modconv=fused_modconv)
        elif nrr != self.img_resolution:
            image = F.interpolate(rgb_image, size=(self.img_resolution, self.img_resolution), mode='bilinear',
                                  align_corners=False, antialias=nrr > self.img_resolution)
        else:
            image = rgb_image
        return dict(image=image, image_raw=rgb_image, image_depth=depth_image)

    def ray_depth(self, z_sum: torch.Tensor, alpha: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Accumulated camera Z (N, 1, r, r) and alpha -> expected distance along each pixel's ray,
        the background at ray_end."""
        cam2world, intrinsics = coords.split_label(c)
        r = z_sum.shape[-1]
        _, dirs = self.ray_sampler(cam2world, intrinsics, r)
        per_z = 1 / (dirs * cam2world[:, None, :3, 2]).sum(-1)                 # ray length per unit of camera Z
        return z_sum * per_z.reshape(-1, 1, r, r) + (1 - alpha) * float(self.rendering_kwargs['ray_end'])

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
        """coordinates, directions [N, M, 3] world units -> dict(sigma [N, M, 1], rgb [N, M, C]).

        sigma is the Gaussians' density sum_i o_i exp(-d^T Sigma_i^-1 d / 2) (unitless: an
        opaque Gaussian's centre counts 1, not EG3D's sigma), rgb the density-weighted mean
        feature (in [0, 1]); directions are not used.
        """
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas)
        return self.sample_mixed(coordinates, directions, ws, v, update_emas=update_emas, noise_mode=noise_mode,
                                 force_fp32=force_fp32, fused_modconv=fused_modconv)

    def sample_mixed(self, coordinates: torch.Tensor, directions: torch.Tensor, ws: torch.Tensor,
                     v: Optional[torch.Tensor] = None, update_emas: bool = False, noise_mode: str = 'random',
                     force_fp32: bool = False, fused_modconv=None) -> dict:
        """Like `sample`, from ws [N, num_ws, w_dim] instead of z."""
        del directions
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim], 'ws')
        g = self.make_gaussians(ws, v, update_emas=update_emas, noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv)
        density, rgb = gr.gaussian_density(coordinates, g['means'], g['covariances'], g['opacities'], g['features'])
        return dict(sigma=density.unsqueeze(-1), rgb=rgb)

    @torch.no_grad()
    def density_function(self, ws: torch.Tensor, v: torch.Tensor):
        """points (1, n, 3) world -> density (1, n, 1) of the Gaussians of ws (made once, noise 'const')."""
        g = self.make_gaussians(ws, v, noise_mode='const')
        return lambda points: gr.gaussian_density(points, g['means'], g['covariances'], g['opacities']).unsqueeze(-1)

    @torch.no_grad()
    def point_cloud(self, ws: torch.Tensor, v: torch.Tensor, min_opacity: float = gr.ALPHA_MIN) -> dict:
        """The Gaussians' centres of the first sample: dict(points (n, 3) world, rgb (n, 3) in [0, 1],
        opacity (n,)), those with opacity >= min_opacity."""
        g = self.make_gaussians(ws[:1], v[:1], noise_mode='const')
        keep = g['opacities'][0] >= min_opacity
        return dict(points=g['means'][0, keep], rgb=g['features'][0, keep, :3].clamp(0, 1), opacity=g['opacities'][0, keep])

    def extra_repr(self):
        return (f'img_resolution={self.img_resolution}, neural_rendering_resolution={self.neural_rendering_resolution}, '
                f'num_vertices={self.num_vertices}, feature_channels={self.feature_channels}, '
                f'num_gaussians={self.rasterizer.num_gaussians}')


def load_topology(G: GaussianGenerator, template_obj_path: str, uv_mask_path: Optional[str] = None) -> GaussianGenerator:
    """Fill G's topology buffers and UV anchors from a template OBJ (v, vt, f with v/vt
    indices) and optionally the face/eye UV mask (the region mesh_depth_err measures).
    The OBJ must have the vertex, face and texture-coordinate counts G was built with."""
    from training.mesh.head_model import load_template, load_uv_mask
    from training.mesh.obj_io import read_obj_vertices
    faces, uvcoords, uvfaces = load_template(template_obj_path)
    verts = read_obj_vertices(template_obj_path)
    found = dict(vertices=len(verts), faces=len(faces), uvs=len(uvcoords))
    expected = dict(vertices=G.num_vertices, faces=G.rasterizer.num_faces, uvs=G.rasterizer.num_uvs)
    if found != expected:
        raise ValueError(f'{template_obj_path}: topology {found} does not match the generator ({expected})')
    mask = None if uv_mask_path is None else load_uv_mask(uv_mask_path, size=None)
    with torch.no_grad():
        G.rasterizer.load_topology(faces, uvfaces, uvcoords, verts, mask, source=template_obj_path)
    G.topology_loaded = True
    return G
