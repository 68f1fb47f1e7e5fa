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
from training.mesh.rasterize import rasterize  # noqa: E402


def render_shaded(verts: torch.Tensor, faces: torch.Tensor, yaw_deg: float = 0.0, size: int = 256,
                  lms: torch.Tensor = None) -> np.ndarray:
    """(V, 3) mesh metres -> (size, size, 3) uint8 orthographic render from yaw `yaw_deg`.

    The view spans +-0.2 m around the mesh shift of `training.coords` (like the texture
    rasterization); background is white, landmarks (68, 3) are drawn as red dots.
    """
    rot = coords.euler_to_matrix(torch.tensor([0.0, yaw_deg, 0.0])).to(verts)
    shift = torch.tensor(coords.MESH_SHIFT).to(verts)
    def to_ndc(p):
        q = (p + shift) @ rot          # rotate the object by -yaw: the camera orbits by +yaw
        return torch.stack([q[:, 0], -q[:, 1], -q[:, 2]], -1) * coords.ORTHO_SCALE
    ndc = to_ndc(verts)
    frags = rasterize(ndc[None], faces, size)
    tri = verts[faces] @ rot
    normal = torch.nn.functional.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=-1)
    light = torch.nn.functional.normalize(torch.tensor([0.3, 0.4, 1.0]).to(verts), dim=0)
    shade = 0.25 + 0.75 * (normal @ light).clamp(min=0)
    p2f = frags.pix_to_face[0]
    img = torch.ones(size, size, 3)
    skin = torch.tensor([0.86, 0.72, 0.62])
    img[p2f >= 0] = shade[p2f[p2f >= 0]][:, None].float() * skin
    img = (img.clamp(0, 1) * 255).byte().numpy()
    if lms is not None:
        pix = ((to_ndc(lms)[:, :2] + 1) * size / 2).round().long().numpy()
        for x, y in pix:
            img[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = [220, 30, 30]
    return img


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
@click.option('--size', default=256, show_default=True, help='Render resolution per view')
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
