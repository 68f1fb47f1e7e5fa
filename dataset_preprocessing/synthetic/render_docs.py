"""Render the documentation pictures of the texture rasterization and the synthetic data.

    python dataset_preprocessing/synthetic/render_docs.py --outdir docs

docs/texture_planes_head.png: a synthetic head with an open mouth, its painted albedo as
    the texture, rasterized by TexturePlaneRasterizer ('aligned' layout): the front, side
    and top renders with their alphas (the mouth hole filled), and the three planes they
    become in grid_sample orientation (next3d axes (x, y), (x, z), (z, y)).
docs/synthetic_dataset_sheet.png: the first 32 images of the synthetic dataset, seed 0, 128x128.
"""

import os
import sys

import click
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dataset_preprocessing.synthetic import make_dataset, scene   # noqa: E402
from training.mesh.head_model import default_head_model_dir       # noqa: E402
from training.mesh.texture_planes import TexturePlaneRasterizer    # noqa: E402


def _to_pil(img: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1], C = 1 or 3."""
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img
    return Image.fromarray((img.clamp(0, 1).permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy())


def _grid(tiles, captions, cols: int, size: int) -> Image.Image:
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new('RGB', (cols * size, rows * (size + 14)), 'white')
    draw = ImageDraw.Draw(sheet)
    for k, (tile, cap) in enumerate(zip(tiles, captions)):
        x, y = (k % cols) * size, (k // cols) * (size + 14)
        sheet.paste(tile.resize((size, size), Image.NEAREST), (x, y + 14))
        draw.text((x + 3, y + 1), cap, fill='black')
    return sheet


def texture_planes_picture() -> Image.Image:
    topo = scene.load_topology()
    s = scene.draw_sample(topo, make_dataset._generator(11, 0))
    s.jaw = 0.3
    verts, _ = scene.pose_meshes(topo, [s])
    tex = scene.paint_texture(topo, torch.Generator().manual_seed(s.texture_seed), s.hair.colour)[None]
    d = default_head_model_dir()
    mod = TexturePlaneRasterizer.from_template(os.path.join(d, 'head_template.obj'), os.path.join(d, 'uv_face_eye_mask.png'))
    out = mod(verts, tex)
    planes = mod.to_planes(out['front'], out['side'], out['top'])[0]
    alphas = mod.to_planes(out['front_alpha'], out['side_alpha'], out['top_alpha'])[0]
    tiles, caps = [], []
    for name in ('front', 'side', 'top'):
        tiles.append(_to_pil(out[name][0].clamp(0, 1)))
        caps.append(f'{name} render')
    for name in ('front', 'side', 'top'):
        tiles.append(_to_pil(out[name + '_alpha'][0]))
        caps.append(f'{name} alpha')
    for k, axes in enumerate(('plane0 (x, y)', 'plane1 (x, z)', 'plane2 (z, y)')):
        tiles.append(_to_pil(planes[k].clamp(0, 1) * (0.3 + 0.7 * alphas[k])))
        caps.append(axes + ' x alpha')
    return _grid(tiles, caps, cols=3, size=256)


def dataset_sheet(count: int = 32, resolution: int = 128) -> Image.Image:
    topo = scene.load_topology()
    samples = [scene.draw_sample(topo, make_dataset._generator(0, i)) for i in range(count)]
    labels = torch.stack([scene.camera_label(s.yaw, s.pitch) for s in samples])
    verts, _ = scene.pose_meshes(topo, samples)
    images = scene.render(topo, samples, verts, labels, resolution)
    sheet = Image.new('RGB', (8 * resolution, (count // 8) * resolution))
    for i, img in enumerate(images):
        sheet.paste(_to_pil(img), ((i % 8) * resolution, (i // 8) * resolution))
    return sheet


@click.command()
@click.option('--outdir', default='docs', show_default=True, help='Where to write the pictures')
def main(outdir):
    torch.set_num_threads(1)
    os.makedirs(outdir, exist_ok=True)
    texture_planes_picture().save(os.path.join(outdir, 'texture_planes_head.png'))
    dataset_sheet().save(os.path.join(outdir, 'synthetic_dataset_sheet.png'))


if __name__ == '__main__':
    main()
