"""Synthetic heads of the bundled head model: appearance, hair, cameras and shaded renders.

Everything a sample needs is drawn from its own `torch.Generator`, so a sample's pixels
depend only on (seed, index), never on batching or worker count (CPU, one thread).

Appearance is painted in the template's UV space as a function of the *neutral* mesh's
3D position under each texel (skin tone with low-frequency variation, lips, brows, eye
liner, sclera / iris / pupil on the eyeballs), so it follows the mesh under any
expression. Hair is an extra shell over the scalp, offset along the normals; it is
rendered but is not part of the mesh written to the dataset, so a generator must explain
it with its static tri-plane, as with real photos. Shading is Lambertian (ambient + one
key light + one fill light), backgrounds are smooth random colour fields, and images are
rendered at twice the output size and box-filtered down (antialiasing).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training import coords
from training.mesh.head_model import default_head_model_dir, load_head_model, load_template
from training.mesh.rasterize import interpolate, perspective_correct_bary, project_perspective, rasterize

TEXTURE_SIZE = 256
BLINK_COMPONENTS = (4, 5)    # the bundled model's expression order: blink left, blink right
SKIN_TONES = torch.tensor([[0.96, 0.80, 0.69], [0.90, 0.70, 0.56], [0.78, 0.57, 0.42],
                           [0.62, 0.43, 0.30], [0.45, 0.30, 0.20], [0.32, 0.21, 0.14]])
HAIR_COLOURS = torch.tensor([[0.05, 0.04, 0.04], [0.18, 0.11, 0.07], [0.35, 0.22, 0.12],
                             [0.55, 0.27, 0.12], [0.80, 0.66, 0.42], [0.62, 0.60, 0.58]])
IRIS_COLOURS = torch.tensor([[0.30, 0.18, 0.08], [0.20, 0.35, 0.55], [0.25, 0.40, 0.22], [0.45, 0.40, 0.35]])


def _uniform(g, lo, hi, size=()):
    return lo + (hi - lo) * torch.rand(size, generator=g)


def _smooth_noise(p: torch.Tensor, g: torch.Generator, octaves: int = 4, scale: float = 20.0) -> torch.Tensor:
    """Cheap band-limited noise (...,) of 3D points (..., 3): random sinusoids, ~[-1, 1]."""
    out = torch.zeros(p.shape[:-1])
    for _ in range(octaves):
        k = F.normalize(torch.randn(3, generator=g), dim=0) * scale * _uniform(g, 0.5, 2.0)
        out = out + torch.sin(p @ k + _uniform(g, 0, 2 * math.pi))
    return out / math.sqrt(octaves / 2)


def _distance_to_polyline(p: torch.Tensor, pts: torch.Tensor, closed: bool) -> torch.Tensor:
    """Distance (N,) of points (N, 3) to the polyline through pts (K, 3)."""
    a = pts
    b = torch.roll(pts, -1, 0) if closed else pts[1:]
    a = a[: len(b)]
    ab = b - a
    t = (((p[:, None] - a[None]) * ab[None]).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-12)).clamp(0, 1)
    return (p[:, None] - (a[None] + t[..., None] * ab[None])).norm(dim=-1).min(1).values


def _inside_polygon_xy(p: torch.Tensor, poly: torch.Tensor) -> torch.Tensor:
    """Whether points (N, 3) lie inside the polygon poly (K, 3), both projected on x-y."""
    x, y = p[:, 0:1], p[:, 1:2]
    ax, ay = poly[:, 0][None], poly[:, 1][None]
    bx, by = torch.roll(poly[:, 0], -1)[None], torch.roll(poly[:, 1], -1)[None]
    crosses = ((ay > y) != (by > y)) & (x < ax + (y - ay) * (bx - ax) / (by - ay + 1e-12))
    return crosses.sum(1) % 2 == 1


@dataclass
class Topology:
    """The bundled head model with everything precomputed for painting and rendering."""
    flame: torch.nn.Module
    faces: torch.Tensor          # (F, 3) int64
    uv_corners: torch.Tensor     # (F, 3, 2) per-corner UVs (v up)
    texel_pos: torch.Tensor      # (T*T, 3) neutral position under each texel (0 where no surface)
    texel_valid: torch.Tensor    # (T*T,) bool
    face_eye: torch.Tensor       # (F,) int64: 0 skin, 1 left eyeball, 2 right eyeball
    eye_centres: torch.Tensor    # (2, 3) neutral eyeball centres
    neutral_lms: torch.Tensor    # (68, 3)
    scalp_faces: torch.Tensor    # (Fs, 3) faces of the head surface (no eyeballs)
    features: dict               # per-texel (T*T,) distances to facial features (neutral mesh)

    @property
    def num_vertices(self) -> int:
        return self.flame.v_template.shape[0]


def load_topology() -> Topology:
    """Build the painting and rendering data of the bundled head model (a few 100 ms)."""
    flame = load_head_model()
    faces, uvcoords, uvfaces = load_template(default_head_model_dir() + '/head_template.obj')
    if not torch.equal(faces, flame.faces):
        raise ValueError('head_template.obj and generic_model.pkl disagree on the faces')
    verts, lms = flame()
    verts, lms = verts[0], lms[0]
    uv_corners = uvcoords[uvfaces]                                               # (F, 3, 2)
    # Eyeballs: vertices skinned mostly to the eye joints (3 = left, 4 = right).
    joint = flame.lbs_weights.argmax(1)
    eye_of_vertex = torch.where(joint == 3, 1, torch.where(joint == 4, 2, 0))
    eye_of_face = eye_of_vertex[faces].max(1).values
    eye_centres = torch.stack([verts[eye_of_vertex == k].mean(0) for k in (1, 2)])
    # Neutral position and eye id under every texel: rasterize the mesh in UV space.
    uv_ndc = torch.cat([uv_corners[..., :1] * 2 - 1, 1 - uv_corners[..., 1:] * 2, torch.zeros_like(uv_corners[..., :1])], -1)
    frag = rasterize(uv_ndc.reshape(1, -1, 3), torch.arange(3 * len(faces)).view(-1, 3), TEXTURE_SIZE, cull_backfaces=False)
    texel_pos = interpolate(verts[faces][None], frag)[0].permute(1, 2, 0).reshape(-1, 3)
    p2f = frag.pix_to_face[0].reshape(-1)
    return Topology(flame, faces, uv_corners, texel_pos, p2f >= 0, eye_of_face, eye_centres, lms,
                    faces[eye_of_face == 0], _feature_maps(texel_pos, lms))


def _feature_maps(p: torch.Tensor, lms: torch.Tensor) -> dict:
    """Distances (m) of each texel's neutral point to the painted features; they depend
    on the neutral mesh only, so they are computed once."""
    outer = lms[48:60]
    front = p[:, 2] > outer[:, 2].min() - 0.015
    cheeks = torch.stack([(lms[31] + lms[3]) / 2, (lms[35] + lms[13]) / 2])
    lift = torch.tensor([0, 0.003, 0])
    return dict(
        lip_inside=_inside_polygon_xy(p, outer) & front,
        lip=torch.where(front, _distance_to_polyline(p, outer, True), torch.full((len(p),), 1.0)),
        cheek=(p[:, None] - cheeks[None]).norm(dim=-1).min(1).values,
        brow=torch.minimum(_distance_to_polyline(p, lms[17:22] + lift, False), _distance_to_polyline(p, lms[22:27] + lift, False)),
        eye=torch.minimum(_distance_to_polyline(p, lms[36:42], True), _distance_to_polyline(p, lms[42:48], True)),
    )


def paint_texture(topo: Topology, g: torch.Generator, hair_colour: torch.Tensor) -> torch.Tensor:
    """A random albedo texture (3, T, T) in [0, 1] (row 0 = v = 1) of the skin.

    The eyeballs are coloured procedurally at render time (`eye_albedo`): the bundled
    template's eyeball UV islands overlap the eyelids' UVs."""
    p = topo.texel_pos
    t = _uniform(g, 0, 1)
    tone = torch.lerp(SKIN_TONES[int(t * (len(SKIN_TONES) - 1))], SKIN_TONES[min(int(t * (len(SKIN_TONES) - 1)) + 1, len(SKIN_TONES) - 1)],
                      (t * (len(SKIN_TONES) - 1)) % 1)
    skin = tone[None] * (1 + 0.06 * _smooth_noise(p, g, scale=30)[:, None]) * (1 + 0.03 * _smooth_noise(p, g, scale=200)[:, None])
    feat = topo.features
    # Cheeks a little redder.
    skin = skin + _uniform(g, 0.0, 0.08) * torch.exp(-(feat['cheek'] / 0.02) ** 2)[:, None] * torch.tensor([1.0, -0.4, -0.4])
    colour = skin
    # Lips: darker and redder inside the outer lip contour (seen from the front), soft edge.
    lip_tone = tone * torch.tensor([0.85, 0.55, 0.55]) * _uniform(g, 0.7, 1.0) + torch.tensor([0.08, 0.0, 0.02])
    lip_w = torch.where(feat['lip_inside'], torch.ones(len(p)), torch.exp(-(feat['lip'] / 0.0015) ** 2))
    colour = torch.lerp(colour, lip_tone[None].expand_as(colour), lip_w[:, None])
    # Brows: hair-coloured band just above each brow line.
    brow_tone = hair_colour * 0.6 + 0.03
    brow_w = torch.sigmoid((_uniform(g, 0.003, 0.006) - feat['brow']) / 0.001) * _uniform(g, 0.6, 1.0)
    colour = torch.lerp(colour, brow_tone[None].expand_as(colour), brow_w[:, None])
    # Eye liner around the eye contours.
    colour = colour * (1 - 0.45 * torch.exp(-(feat['eye'] / 0.0025) ** 2))[:, None]
    colour = torch.where(topo.texel_valid[:, None], colour, tone[None].expand_as(colour))
    return colour.clamp(0, 1).T.reshape(3, TEXTURE_SIZE, TEXTURE_SIZE)


def eye_albedo(topo: Topology, p: torch.Tensor, eye: torch.Tensor, iris: torch.Tensor) -> torch.Tensor:
    """Sclera, iris and pupil (N, 3) at neutral points p (N, 3) of eyeball `eye` (N,) in {1, 2},
    by the angle from the eyeball's forward (+z) axis."""
    cos = F.normalize(p - topo.eye_centres[eye - 1], dim=-1)[:, 2]
    colour = torch.where((cos > 0.87)[:, None], iris[None], torch.tensor([[0.92, 0.9, 0.88]]))
    return torch.where((cos > 0.97)[:, None], torch.full_like(colour, 0.03), colour)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals (B, V, 3) of counter-clockwise (outward) faces."""
    tri = verts[:, faces]
    n = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
    out = torch.zeros_like(verts)
    for k in range(3):
        out.index_add_(1, faces[:, k], n)
    return F.normalize(out, dim=-1)


@dataclass
class HairStyle:
    colour: torch.Tensor       # (3,)
    front: float               # hairline height above the brows at the front (m)
    back: float                # lowest hair height at the back (m, mesh y)
    power: float               # how fast the hairline drops from front to back
    thickness: float           # shell offset (m)
    seed: int                  # for the shell's bumps and strands


def draw_hair(g: torch.Generator) -> HairStyle:
    return HairStyle(colour=HAIR_COLOURS[int(torch.randint(len(HAIR_COLOURS), (), generator=g))] * _uniform(g, 0.8, 1.2),
                     front=float(_uniform(g, 0.03, 0.06)), back=float(_uniform(g, -0.09, -0.01)),
                     power=float(_uniform(g, 0.7, 2.5)), thickness=float(_uniform(g, 0.006, 0.025)),
                     seed=int(torch.randint(2**31 - 1, (), generator=g)))


def hair_shell(topo: Topology, verts: torch.Tensor, normals: torch.Tensor, style: HairStyle):
    """Shell over the scalp of one posed head: (V, 3) vertices (all of the head's, offset),
    (Fh, 3) faces (a subset of the scalp faces, same winding)."""
    g = torch.Generator().manual_seed(style.seed)
    p0 = topo.flame.v_template
    brow_y = float(topo.neutral_lms[17:27, 1].mean())
    phi = torch.atan2(p0[:, 0], p0[:, 2])                                        # 0 = front
    front_weight = ((1 + torch.cos(phi)) / 2) ** style.power
    hairline = style.back + (brow_y + style.front - style.back) * front_weight
    bump = _smooth_noise(p0, g, octaves=3, scale=40)
    inside = p0[:, 1] > hairline + 0.004 * bump
    faces = topo.scalp_faces[inside[topo.scalp_faces].all(1)]
    height = (p0[:, 1] - hairline).clamp(min=0)
    offset = style.thickness * (0.6 + 0.4 * torch.tanh(height / 0.02)) * (1 + 0.25 * bump)
    return verts + normals * offset[:, None], faces


def hair_albedo(p: torch.Tensor, style: HairStyle) -> torch.Tensor:
    """Strand-like albedo (N, 3) at neutral-space points (N, 3) on the hair shell."""
    g = torch.Generator().manual_seed(style.seed + 1)
    phi = torch.atan2(p[:, 0], p[:, 2])
    wave = _smooth_noise(p, g, octaves=2, scale=25)
    strands = 0.8 + 0.2 * torch.sin(70 * phi + 3 * wave) * torch.sin(23 * phi - 2 * wave)
    return (style.colour[None] * strands[:, None]).clamp(0, 1)


def background(g: torch.Generator, size: int) -> torch.Tensor:
    """(3, size, size) smooth random colour field."""
    a, b = torch.rand(3, generator=g), torch.rand(3, generator=g)
    ramp = torch.linspace(0, 1, size)
    base = a[:, None, None] + (b - a)[:, None, None] * ramp[None, :, None]
    blobs = F.interpolate(torch.rand(1, 3, 5, 5, generator=g), size=(size, size), mode='bicubic', align_corners=False)[0]
    return (0.75 * base + 0.25 * blobs).clamp(0, 1).expand(3, size, size)


@dataclass
class Sample:
    shape: torch.Tensor          # (n_shape,)
    expression: torch.Tensor     # (n_exp,)
    jaw: float                   # radians, + opens
    yaw: float                   # camera orbit angles (coords.cam2world_look_at)
    pitch: float
    texture_seed: int
    hair: HairStyle
    iris: torch.Tensor           # (3,) iris colour
    light: torch.Tensor          # (3,) unit direction towards the key light (mesh axes)
    light_strength: float
    ambient: float
    background_seed: int


def draw_sample(topo: Topology, g: torch.Generator) -> Sample:
    fl = topo.flame
    shape = torch.randn(fl.n_shape, generator=g) * 0.9
    expression = torch.randn(fl.n_exp, generator=g) * 0.45 * (torch.rand(fl.n_exp, generator=g) < 0.5)
    jaw = float(_uniform(g, 0.0, 0.35)) if float(_uniform(g, 0, 1)) < 0.5 else 0.0
    yaw = math.pi / 2 + float(torch.randn((), generator=g).clamp(-3, 3)) * 0.3
    pitch = math.pi / 2 + float(torch.randn((), generator=g).clamp(-3, 3)) * 0.15
    light = F.normalize(torch.tensor([0.0, 0.5, 1.0]) + 0.6 * torch.randn(3, generator=g), dim=0)
    iris = IRIS_COLOURS[int(torch.randint(len(IRIS_COLOURS), (), generator=g))] * _uniform(g, 0.7, 1.2)
    return Sample(shape, expression, jaw, yaw, pitch, int(torch.randint(2**31 - 1, (), generator=g)), draw_hair(g),
                  iris, light, float(_uniform(g, 0.5, 0.9)), float(_uniform(g, 0.25, 0.45)),
                  int(torch.randint(2**31 - 1, (), generator=g)))


def camera_label(yaw: float, pitch: float) -> torch.Tensor:
    """(25,) label of an FFHQ-like camera (radius 2.7, pivot (0, 0, 0.2), focal 4.2647)."""
    return coords.make_label(coords.cam2world_look_at(torch.tensor([yaw]), torch.tensor([pitch])))[0]


def pose_meshes(topo: Topology, samples) -> tuple:
    """Canonical vertices (B, V, 3) and landmarks (B, 68, 3) of the samples."""
    jaw = torch.tensor([[s.jaw, 0.0, 0.0] for s in samples])
    verts, lms = topo.flame(shape=torch.stack([s.shape for s in samples]),
                            expression=torch.stack([s.expression for s in samples]), jaw_pose=jaw)
    return verts, lms


def render(topo: Topology, samples, verts: torch.Tensor, labels: torch.Tensor, resolution: int,
           textures=None) -> torch.Tensor:
    """Shaded, antialiased images (B, 3, R, R) in [0, 1] of posed canonical meshes.

    Each sample is rendered at 2R with its own hair shell and composited over its
    background; the result is box-filtered to R.
    """
    size = 2 * resolution
    normals = vertex_normals(verts, topo.faces)
    images = []
    for i, s in enumerate(samples):
        hv, hf = hair_shell(topo, verts[i], normals[i], s.hair)
        nv, nf = topo.num_vertices, len(topo.faces)
        all_verts = torch.cat([verts[i], hv])[None]
        # Front faces, then the same faces reversed: with back faces culled, the reversed
        # copies show the inside of the head through the open mouth and the inside of the
        # hair shell, at no cost where they face away.
        outer = torch.cat([topo.faces, hf + nv])
        all_faces = torch.cat([outer, outer[:, [0, 2, 1]]])
        ndc = project_perspective(coords.mesh_to_world(all_verts), labels[i:i + 1])
        frag = perspective_correct_bary(rasterize(ndc, all_faces, size), ndc, all_faces)
        p2f = frag.pix_to_face[0]
        covered = p2f >= 0
        facing_away = p2f >= len(outer)
        p2f_outer = torch.where(facing_away, p2f - len(outer), p2f)
        is_hair = covered & (p2f_outer >= nf)
        # Head albedo from the painted texture; per-corner UVs of hair faces are unused.
        tex = textures[i] if textures is not None else paint_texture(topo, torch.Generator().manual_seed(s.texture_seed), s.hair.colour)
        uv_corners = torch.cat([topo.uv_corners, torch.zeros(len(hf), 3, 2)])
        uv_corners = torch.cat([uv_corners, uv_corners[:, [0, 2, 1]]])
        uv = interpolate(uv_corners, frag)[0]                                    # (2, S, S)
        grid = torch.stack([uv[0] * 2 - 1, 1 - uv[1] * 2], -1)[None]
        albedo = F.grid_sample(tex[None], grid, mode='bilinear', align_corners=False)[0]
        # Neutral positions (procedural hair and eyes) and normals, hair vertices = head's.
        per_vertex = torch.cat([topo.flame.v_template, normals[i]], dim=1).repeat(2, 1)[None]
        pos, n = interpolate(per_vertex, frag, all_faces)[0].split(3)
        pos, n = pos.permute(1, 2, 0), F.normalize(n, dim=0)
        albedo[:, is_hair] = hair_albedo(pos[is_hair], s.hair).T
        eye = torch.where(covered & ~is_hair, topo.face_eye[p2f_outer.clamp(0, nf - 1)], torch.zeros_like(p2f))
        is_eye = eye > 0
        albedo[:, is_eye] = eye_albedo(topo, pos[is_eye], eye[is_eye], s.iris).T
        key = (n * s.light[:, None, None]).sum(0).clamp(min=0)
        fill = (n * torch.tensor([-s.light[0], 0.2, 0.8])[:, None, None]).sum(0).clamp(min=0) * 0.25
        shaded = albedo * (s.ambient + s.light_strength * key + fill)
        cavity = torch.tensor([0.35, 0.12, 0.12])[:, None, None] * s.ambient    # mouth: dark red
        shaded = torch.where((facing_away & ~is_hair)[None], albedo * cavity, shaded)
        shaded = torch.where((facing_away & is_hair)[None], albedo * 0.4 * s.ambient, shaded)
        bg = background(torch.Generator().manual_seed(s.background_seed), size)
        img = torch.where(covered[None], shaded, bg)
        images.append(F.avg_pool2d(img[None], 2)[0])
    return torch.stack(images).clamp(0, 1)
