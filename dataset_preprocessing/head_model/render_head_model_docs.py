"""Renders the pictures of the procedural head model for the docs.

    python dataset_preprocessing/head_model/render_head_model_docs.py --outdir docs

Writes head_model_neutral.png (front, three-quarter and side views with landmarks),
head_model_mouth_open.png (jaw at 20 degrees and a few expressions, front view, where
the background shows through the mouth) and head_model_uv.png (the UV layout over the
face/eye mask). Orthographic views with the project's rasterizer, flat Lambert shading.
"""

import io
import os
import sys

import click
import numpy as np
import torch

if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from torch_utils.persistence import atomic_write_bytes  # noqa: E402
from training import coords  # noqa: E402
from training.mesh.head_model import default_head_model_dir, load_head_model, load_template, load_uv_mask  # noqa: E402


def zbuffer(px: np.ndarray, depth: np.ndarray, faces: np.ndarray, size: int) -> np.ndarray:
    """Index of the nearest face per pixel (-1 where empty); px (V, 2) pixel coords, depth (V,)
    larger = nearer. A plain per-face loop over bounding boxes: slow but independent."""
    zbuf = np.full((size, size), -np.inf)
    out = np.full((size, size), -1, dtype=np.int64)
    for k, (a, b, c) in enumerate(faces):
        p = px[[a, b, c]]
        x0, y0 = np.floor(p.min(0)).astype(int)
        x1, y1 = np.ceil(p.max(0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size - 1), min(y1, size - 1)
        if x0 > x1 or y0 > y1:
            continue
        gx, gy = np.meshgrid(np.arange(x0, x1 + 1) + 0.5, np.arange(y0, y1 + 1) + 0.5)
        d = np.linalg.det(np.array([[p[1, 0] - p[0, 0], p[2, 0] - p[0, 0]], [p[1, 1] - p[0, 1], p[2, 1] - p[0, 1]]]))
        if abs(d) < 1e-12:
            continue
        w1 = ((gx - p[0, 0]) * (p[2, 1] - p[0, 1]) - (gy - p[0, 1]) * (p[2, 0] - p[0, 0])) / d
        w2 = ((gy - p[0, 1]) * (p[1, 0] - p[0, 0]) - (gx - p[0, 0]) * (p[1, 1] - p[0, 1])) / d
        w0 = 1 - w1 - w2
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        z = w0 * depth[a] + w1 * depth[b] + w2 * depth[c]
        sub = zbuf[y0:y1 + 1, x0:x1 + 1]
        win = inside & (z > sub)
        sub[win] = z[win]
        out[y0:y1 + 1, x0:x1 + 1][win] = k
    return out


def render_shaded(verts: torch.Tensor, faces: torch.Tensor, yaw_deg: float = 0.0, size: int = 256,
                  lms: torch.Tensor = None, supersample: int = 2) -> np.ndarray:
    """(V, 3) mesh metres -> (size, size, 3) uint8 orthographic render from yaw `yaw_deg`.

    The view spans +-0.2 m around the mesh shift of `training.coords`, like the texture
    rasterization. Back faces culled, nearest surface per pixel (a small numpy z-buffer,
    independent of the training rasterizer), flat Lambert shading, white background;
    landmarks (68, 3) drawn as red dots.
    """
    from PIL import Image, ImageDraw
    rot = coords.euler_to_matrix(torch.tensor([0.0, yaw_deg, 0.0])).double()
    shift = torch.tensor(coords.MESH_SHIFT).double()
    to_view = lambda p: ((p.double() + shift) @ rot).numpy()      # the camera orbits by +yaw
    big = size * supersample
    to_px = lambda q: np.stack([(q[:, 0] * coords.ORTHO_SCALE + 1) * big / 2, (1 - q[:, 1] * coords.ORTHO_SCALE) * big / 2], -1)
    q = to_view(verts)
    f = faces.numpy()
    tri = q[f]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-20
    front = np.flatnonzero(normal[:, 2] > 0)                    # facing the viewer (+z)
    face_id = zbuffer(to_px(q), q[:, 2], f[front], big)
    light = np.array([0.3, 0.4, 1.0]) / np.linalg.norm([0.3, 0.4, 1.0])
    shade = 0.25 + 0.75 * np.clip(normal[front] @ light, 0, None)
    img = np.full((big, big, 3), 255.0)
    hit = face_id >= 0
    img[hit] = shade[face_id[hit]][:, None] * np.array([220.0, 184.0, 158.0])
    img = Image.fromarray(img.astype(np.uint8))
    if lms is not None:
        draw = ImageDraw.Draw(img)
        for x, y in to_px(to_view(lms)):
            r = 1.2 * supersample
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(220, 30, 30))
    return np.asarray(img.resize((size, size), Image.LANCZOS))


def _png(img: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='PNG')
    return buf.getvalue()


def uv_layout_image(uvcoords: np.ndarray, uvfaces: np.ndarray, mask: np.ndarray, size: int = 512) -> np.ndarray:
    """UV triangles (image row 0 = v 1) drawn over the face/eye mask."""
    from PIL import Image, ImageDraw
    base = Image.fromarray((mask * 120 + 60).astype(np.uint8)).resize((size, size), Image.NEAREST).convert('RGB')
    draw = ImageDraw.Draw(base)
    pts = np.stack([uvcoords[:, 0] * size, (1 - uvcoords[:, 1]) * size], -1)
    for tri in uvfaces:
        draw.polygon([tuple(pts[k]) for k in tri], outline=(40, 90, 200))
    return np.asarray(base)


@click.command()
@click.option('--outdir', default='docs', show_default=True, help='Where to write the PNGs')
@click.option('--size', default=256, show_default=True, help='Render width and height per view, in pixels')
def main(outdir, size):
    """Renders the docs pictures of the bundled head model."""
    torch.set_num_threads(2)
    flame = load_head_model()
    faces = flame.faces
    with torch.no_grad():
        v, lms = flame()
        neutral = np.concatenate([render_shaded(v[0], faces, yaw, size, lms[0]) for yaw in (0, 35, 90)], 1)
        atomic_write_bytes(os.path.join(outdir, 'head_model_neutral.png'), _png(neutral))
        jaw = torch.tensor([[np.deg2rad(20.0), 0, 0]])
        exp = torch.zeros(4, flame.n_exp)
        exp[1, 0] = 2.0       # smile
        exp[2, 1] = 2.0       # brow raise
        exp[3, 4] = exp[3, 5] = 1.0   # blink both
        v_open, lms_open = flame(jaw_pose=jaw.expand(4, 3), expression=exp)
        side = render_shaded(v_open[0], faces, 35, size, lms_open[0])
        row = [render_shaded(v_open[k], faces, 0, size, None) for k in range(4)]
        atomic_write_bytes(os.path.join(outdir, 'head_model_mouth_open.png'), _png(np.concatenate(row + [side], 1)))
    _, uvcoords, uvfaces = load_template(os.path.join(default_head_model_dir(), 'head_template.obj'))
    mask = load_uv_mask(os.path.join(default_head_model_dir(), 'uv_face_eye_mask.png')).numpy()
    atomic_write_bytes(os.path.join(outdir, 'head_model_uv.png'), _png(uv_layout_image(uvcoords.numpy(), uvfaces.numpy(), mask)))
    click.echo(f'wrote {outdir}/head_model_neutral.png, head_model_mouth_open.png, head_model_uv.png')


if __name__ == '__main__':
    main()
