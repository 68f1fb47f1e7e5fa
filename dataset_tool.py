"""Pack a dataset (images, camera labels, meshes, landmarks) into one zip that loads fast.

    python dataset_tool.py --source=data/ffhq --dest=data/ffhq512-packed.zip
    python dataset_tool.py --source=data/ffhq/images512x512 --rdata=data/ffhq/meshes512x512 --dest=ffhq.zip

The zip holds the PNGs (stored as they are, not re-encoded) at their relative paths,
`dataset.json` (labels in the packed order), `dataset_exp.json` when the source has
expression values, and two uncompressed arrays in the same order: `vertices.npy`
(N, V, 3) float32 and `landmarks.npy` (N, 68, 3) float32. `training.dataset.
MeshImageDataset` reads it without parsing any .obj file. Every mesh, landmark file,
image and label is validated while packing.
"""

import io
import json
import time
import zipfile

import click
import numpy as np

from dnnlib import cli
from torch_utils.persistence import atomic_output
from training.dataset import EXP_FILE, LABEL_FILES, PACKED_LANDMARKS, PACKED_VERTICES, MeshImageDataset


def pack_dataset(source: str, dest: str, mesh_path: str = None, load_lms: bool = True) -> dict:
    """Write the packed zip `dest` (atomically); returns dict(items, num_vertices, seconds)."""
    start = time.time()
    dataset = MeshImageDataset(source, mesh_path=mesh_path, load_lms=load_lms, validate='full')
    labels, exps, verts, lms = [], [], [], []
    try:
        with atomic_output(dest) as tmp, zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as z:
            for rec in dataset.raw_records():
                z.writestr(rec['relpath'], rec['image_bytes'])
                labels.append([rec['relpath'], rec['camera'].tolist()])
                if rec['expression'] is not None:
                    exps.append([rec['relpath'], rec['expression'].tolist()])
                verts.append(rec['vertices'])
                lms.append(rec['landmarks'])
            z.writestr(LABEL_FILES[0], json.dumps({'labels': labels}))
            if exps:
                z.writestr(EXP_FILE, json.dumps({'labels': exps}))
            for name, arrays in ((PACKED_VERTICES, verts), (PACKED_LANDMARKS, lms)):
                buffer = io.BytesIO()
                np.save(buffer, np.stack(arrays).astype(np.float32))
                z.writestr(name, buffer.getvalue())
    finally:
        dataset.close()
    return dict(items=len(labels), num_vertices=int(verts[0].shape[0]), seconds=time.time() - start)


def time_loading(path: str, mesh_path: str = None, repeats: int = 1) -> float:
    """Seconds to open the dataset and read every item's mesh and landmarks (best of `repeats`; warm file cache)."""
    best = float('inf')
    for _ in range(repeats):
        start = time.time()
        dataset = MeshImageDataset(path, mesh_path=mesh_path, validate='first')
        for i in range(len(dataset)):
            dataset.get_vertices(i)
        dataset.close()
        best = min(best, time.time() - start)
    return best


@click.command()
@click.option('--source', help='Dataset root, images<R>x<R> folder, or zip', metavar='PATH', required=True)
@click.option('--dest', help='Output zip', metavar='PATH', type=click.Path(dir_okay=False), required=True)
@click.option('--rdata', help='Meshes folder (default: next to the images)', metavar='DIR')
@click.option('--load_lms', help='Pack the landmarks (False: zeros)', type=bool, default=True, show_default=True)
@click.option('--benchmark', help='Also time reading all meshes before and after packing', is_flag=True)
@cli.user_errors
def main(source, dest, rdata, load_lms, benchmark):
    """Pack images, labels, meshes and landmarks into one zip."""
    info = pack_dataset(source, dest, mesh_path=rdata, load_lms=load_lms)
    print(f'Packed {info["items"]} items ({info["num_vertices"]} vertices each) into {dest} in {info["seconds"]:.1f}s')
    if benchmark:
        before = time_loading(source, rdata, repeats=3)
        after = time_loading(dest, repeats=3)
        print(f'Reading all meshes: source {before:.3f}s, packed {after:.3f}s ({before / after:.1f}x faster)')


if __name__ == '__main__':
    main()
