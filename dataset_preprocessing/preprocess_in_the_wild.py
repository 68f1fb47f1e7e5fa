"""In-the-wild photos or a video -> a training dataset (SPEC section 8) or a driving folder.

    python dataset_preprocessing/preprocess_in_the_wild.py --indir photos/ --outdir data/mine
    python dataset_preprocessing/preprocess_in_the_wild.py --indir talk.mp4 --outdir drive/ --mode driving --fps 10

Per image: 68 landmarks of the largest face (dlib, or `--landmarks` files), EG3D's crop
from five of them (`alignment.py`), the head pose as a 25-float camera label
(`pose_label.py`; from Deep3DFaceRecon's `.mat` files with `--recon-mat`, else fitted),
and a FLAME-format mesh fitted to the landmarks under that camera (`fit_flame.py`),
written in canonical space with its 68 3D landmarks. A check image per input shows the
crop, the detected landmarks (green), the fitted ones (red) and the fitted mesh, so that
a bad fit is seen at a glance. Inputs without a usable face are listed in skipped.txt.

Outputs, `--mode dataset`:
    images{R}x{R}/00000/img00000000.png, images{R}x{R}/dataset.json, meshes{R}x{R}/...obj,
    lms{R}x{R}/...txt (68 x 3), images{R}x{R}/dataset_exp.json (per image the fitted
    expression coefficients then the jaw axis-angle: n_exp + 3 floats), sources.txt
    (output name, input, mirrored, landmark error in pixels at 512), checks/, skipped.txt
`--mode driving`: <id>.png, dataset.json, <id>.obj, <id>_kpt2d.txt (68 x 3), checks/,
skipped.txt, with <id> = 00000, 00001, ...

A video is one identity: its frames share the shape coefficients and are smoothed in
time. Photos are fitted one by one, each with its own shape.

With --recon-mat, Deep3DFaceRecon's head angles are kept and its translation is not used:
it locates the head relative to a crop aligned to the BFM's standard landmarks, while our
crop is aligned to our head model's (`alignment.STANDARD_LANDMARKS_5`), so the
translation and scale are re-fitted to the landmarks under the given rotation.

Measured accuracy (synthetic heads, exact landmarks; benchmarks/preprocess_fit_accuracy.py):
about 0.4 deg mean pose error and 0.1 px landmark error at 512. With dlib's landmarks the
error is dominated by how dlib and the head model define the points (e.g. the jaw line on
the silhouette vs fixed on the mesh): several degrees; check the check images.
"""

import io
import json
import math
import os
import sys
import time
from typing import Iterable, Iterator, List, NamedTuple, Optional, Tuple

import click
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

if __name__ == '__main__' and __package__ is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset_preprocessing import alignment, fit_flame, landmarks, pose_label      # noqa: E402
from dnnlib import cli                                                              # noqa: E402
from torch_utils.persistence import atomic_write_bytes                              # noqa: E402
from training import coords                                                         # noqa: E402
from training.mesh.obj_io import write_landmarks, write_obj                         # noqa: E402

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
VIDEO_EXTENSIONS = ('.mp4', '.mov', '.avi', '.mkv', '.webm', '.m4v')
VIDEO_SMOOTHNESS = 0.5              # see fit_flame.fit_head: a 1-pixel jump between frames costs 0.5 px^2
FLAME_COMPONENTS = (100, 50)         # at most this many identity and expression components are fitted (as DECA)


class Frame(NamedTuple):
    name: str                        # input file name, or "<video>#<frame index>"
    stem: str                        # for --landmarks / --recon-mat look-ups
    image: Optional[np.ndarray]      # (H, W, 3) uint8, None until loaded (photos load lazily)
    path: Optional[str]


class Prepared(NamedTuple):
    frame: Frame
    crop: Image.Image                # the EG3D crop
    points: np.ndarray               # (K, 2) detected landmarks in crop pixels (K = 68 or 5)
    angles: Optional[np.ndarray]     # (3,) head angles from a Deep3DFaceRecon .mat, else None


# ----------------------------------------------------------------------------------------------
# Inputs

def list_frames(indir: str, fps: Optional[float]) -> Tuple[Iterable[Frame], int, bool]:
    """Photos of a folder (sorted by name) or the frames of a video -> (frames, count, is_video).

    A video's frames are decoded one at a time as they are consumed (only their crops are
    kept), so long videos do not fill the memory.
    """
    if os.path.isdir(indir):
        names = sorted(n for n in os.listdir(indir) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise click.ClickException(f'{indir}: no images ({", ".join(IMAGE_EXTENSIONS)})')
        return [Frame(n, os.path.splitext(n)[0], None, os.path.join(indir, n)) for n in names], len(names), False
    if os.path.isfile(indir) and indir.lower().endswith(VIDEO_EXTENSIONS):
        return read_video(indir, fps)
    raise click.ClickException(f'{indir}: not a folder of images nor a video ({", ".join(VIDEO_EXTENSIONS)})')


def read_video(path: str, fps: Optional[float]) -> Tuple[Iterator[Frame], int, bool]:
    """Frames of a video through imageio-ffmpeg's bundled ffmpeg, subsampled to about `fps`.

    Frame i of the video is named "<video>#i"; its landmark / .mat files are <i:05d>.txt/.mat.
    """
    import imageio.v2 as imageio
    try:
        reader = imageio.get_reader(path, 'ffmpeg')
        meta = reader.get_meta_data()
    except Exception as e:
        raise click.ClickException(f'{path}: cannot read the video ({e})') from None
    src_fps = float(meta.get('fps', 0) or 0)
    step = max(1, int(round(src_fps / fps))) if fps and src_fps > 0 else 1
    total = meta.get('nframes', float('inf'))
    count = int(math.ceil(total / step)) if math.isfinite(total) else None

    def frames():
        try:
            for i, img in enumerate(reader):
                if i % step == 0:
                    yield Frame(f'{os.path.basename(path)}#{i}', f'{i:05d}', np.asarray(img)[..., :3], None)
        except Exception as e:
            raise click.ClickException(f'{path}: cannot read the video ({e})') from None
        finally:
            reader.close()
    return frames(), count, True


def load_image(frame: Frame) -> np.ndarray:
    if frame.image is not None:
        return frame.image
    try:
        with Image.open(frame.path) as img:
            return np.asarray(img.convert('RGB'))
    except Exception as e:
        raise ValueError(f'unreadable image ({type(e).__name__}: {e})') from None


# ----------------------------------------------------------------------------------------------
# Per-image steps

def prepare(frame: Frame, detector, landmark_dir: Optional[str], mat_dir: Optional[str], resolution: int) -> Prepared:
    """Landmarks -> EG3D crop and crop-space landmarks (+ the .mat pose). Raises ValueError to skip."""
    image = load_image(frame)
    points = None
    if landmark_dir is not None:
        path = os.path.join(landmark_dir, frame.stem + '.txt')
        if os.path.isfile(path):
            points = landmarks.read_landmarks_txt(path)
        elif detector is None:
            raise ValueError(f'no landmark file {path} and no detector installed')
    if points is None:
        points = detector.detect(image)
    five = points if len(points) == 5 else alignment.landmarks_68_to_5(points)
    box, _, _ = alignment.align_face(five, size=resolution)
    crop = alignment.crop_image(Image.fromarray(image), box)
    angles = None
    if mat_dir is not None:
        path = pose_label.find_deep3d_mat(mat_dir, frame.stem)
        if path is None:
            raise ValueError(f'no Deep3DFaceRecon result {os.path.join(mat_dir, frame.stem + ".mat")}')
        angles, _ = pose_label.load_deep3d_mat(path)
    return Prepared(frame._replace(image=None), crop, box.to_crop(points), angles)     # keep the crop only


def fit(model: fit_flame.HeadModelAdapter, items: List[Prepared], resolution: int, video: bool, mirrored_of=None):
    """Fit one batch (a video: shared shape, smoothed) or one photo."""
    k = len(items[0].points)
    matrix = None if k == 68 else alignment.five_from_68_matrix()
    angles = None
    if items[0].angles is not None:
        angles = np.stack([it.angles for it in items])
    kwargs = dict(groups=np.zeros(len(items)) if video else None, landmark_matrix=matrix,
                  smoothness=VIDEO_SMOOTHNESS if video else 0.0, fixed_angles=angles)
    if mirrored_of is not None:
        kwargs.update(fixed_labels=pose_label.mirror_label(torch.as_tensor(mirrored_of.labels)).numpy(),
                      fixed_scale=mirrored_of.scale, fixed_angles=None)
    return fit_flame.fit_head(model, np.stack([it.points for it in items]), resolution, **kwargs)


def mirror_prepared(item: Prepared) -> Prepared:
    """The left-right mirrored crop and its landmarks (re-ordered, see `landmarks.mirror_landmarks_2d`)."""
    crop = item.crop.transpose(Image.FLIP_LEFT_RIGHT)
    return Prepared(item.frame, crop, landmarks.mirror_landmarks_2d(item.points, crop.size[0]), None)


def check_image(item: Prepared, result: fit_flame.FitResult, i: int, faces: torch.Tensor, size: int = 256) -> Image.Image:
    """The crop, the fitted mesh (shaded, half transparent), detected (green) and fitted (red) landmarks."""
    from training.mesh.rasterize import rasterize
    img = np.asarray(item.crop.resize((size, size), Image.BILINEAR)).astype(np.float32)
    label = torch.as_tensor(result.labels[i:i + 1])
    verts = torch.as_tensor(result.vertices[i:i + 1])
    ones = torch.ones(1)
    px = fit_flame.project_landmarks(verts, ones, label, 1.0)                      # [0, 1] image units
    cam2world = label[:, :16].reshape(1, 4, 4)
    depth = ((coords.mesh_to_world(verts) - cam2world[:, None, :3, 3]) * cam2world[:, None, :3, 2]).sum(-1)
    ndc = torch.cat([px * 2 - 1, depth[..., None]], dim=-1)
    frags = rasterize(ndc, faces, size)
    covered = frags.pix_to_face[0] >= 0
    if covered.any():
        tri = ndc[0][faces]
        normal = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        shade = (-normal[:, 2] / normal.norm(dim=-1).clamp_min(1e-12)).clamp(0, 1)
        value = (60 + 195 * shade[frags.pix_to_face[0].clamp(min=0)]).numpy()
        mask = covered.numpy()
        img[mask] = 0.5 * img[mask] + 0.5 * value[mask, None]
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    scale = size / item.crop.size[0]
    for (x, y), color in [(p * scale, (0, 255, 0)) for p in item.points] + [(p * size, (255, 0, 0)) for p in result.projected[i] / item.crop.size[0]]:
        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=color)
    return out


# ----------------------------------------------------------------------------------------------
# Outputs

def save_png(path: str, image: Image.Image):
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    atomic_write_bytes(path, buf.getvalue())


class OutputWriter:
    """Writes results as they come (dataset or driving layout) and the index files at the end."""

    def __init__(self, mode: str, outdir: str, resolution: int, faces: torch.Tensor):
        self.mode, self.outdir, self.resolution = mode, outdir, resolution
        self.faces = faces
        self.labels, self.expressions, self.sources, self.errors = [], [], [], []

    def _paths(self, index: int):
        """(image, mesh, landmarks, name in dataset.json) of output `index`."""
        if self.mode == 'driving':
            fid = f'{index:05d}'
            return (os.path.join(self.outdir, fid + '.png'), os.path.join(self.outdir, fid + '.obj'),
                    os.path.join(self.outdir, fid + '_kpt2d.txt'), fid + '.png')
        r = f'{self.resolution}x{self.resolution}'
        rel = f'{index // 1000:05d}/img{index:08d}'
        return (os.path.join(self.outdir, f'images{r}', rel + '.png'), os.path.join(self.outdir, f'meshes{r}', rel + '.obj'),
                os.path.join(self.outdir, f'lms{r}', rel + '.txt'), rel + '.png')

    def json_dir(self) -> str:
        return self.outdir if self.mode == 'driving' else os.path.join(self.outdir, f'images{self.resolution}x{self.resolution}')

    def add(self, items: List[Prepared], result: fit_flame.FitResult, mirrored: bool):
        for i, item in enumerate(items):
            index = len(self.labels)
            img_path, obj_path, lms_path, rel = self._paths(index)
            check_path = os.path.join(self.outdir, 'checks', f'{index:05d}.png')
            for path in (img_path, obj_path, lms_path, check_path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            save_png(img_path, item.crop)
            write_obj(obj_path, result.vertices[i], self.faces.numpy())
            write_landmarks(lms_path, result.landmarks[i])
            save_png(check_path, check_image(item, result, i, self.faces))
            self.labels.append([rel, [float(x) for x in result.labels[i]]])
            self.expressions.append([rel, [float(x) for x in np.concatenate([result.expression[i], result.jaw_pose[i]])]])
            self.sources.append(f'{rel}\t{item.frame.name}\t{int(mirrored)}\t{result.error_px[i]:.3f}')
            self.errors.append(float(result.error_px[i]))

    def finish(self, skipped):
        if self.labels:
            os.makedirs(self.json_dir(), exist_ok=True)
            atomic_write_bytes(os.path.join(self.json_dir(), 'dataset.json'), json.dumps({'labels': self.labels}, indent=1).encode())
            if self.mode == 'dataset':
                atomic_write_bytes(os.path.join(self.json_dir(), 'dataset_exp.json'), json.dumps({'labels': self.expressions}).encode())
        header = 'output\tinput\tmirrored\tlandmark_error_px_at_512\n'
        atomic_write_bytes(os.path.join(self.outdir, 'sources.txt'), (header + ''.join(s + '\n' for s in self.sources)).encode())
        atomic_write_bytes(os.path.join(self.outdir, 'skipped.txt'), ''.join(f'{n}\t{why}\n' for n, why in skipped).encode())


def load_model(flame_dir: Optional[str]) -> fit_flame.HeadModelAdapter:
    from training.mesh.flame import FlameModel
    from training.mesh.head_model import load_head_model
    if flame_dir is None:
        return fit_flame.HeadModelAdapter(load_head_model())
    pkl, emb = os.path.join(flame_dir, 'generic_model.pkl'), os.path.join(flame_dir, 'landmark_embedding.npy')
    for p in (pkl, emb):
        if not os.path.isfile(p):
            raise click.ClickException(f'{p}: missing (--flame needs generic_model.pkl and landmark_embedding.npy)')
    try:
        flame = FlameModel(pkl, emb)
        n_shape, n_exp = min(flame.n_shape, FLAME_COMPONENTS[0]), min(flame.n_exp, FLAME_COMPONENTS[1])
        if (n_shape, n_exp) != (flame.n_shape, flame.n_exp):
            flame = FlameModel(pkl, emb, n_shape=n_shape, n_exp=n_exp)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    return fit_flame.HeadModelAdapter(flame)


@click.command()
@click.option('--indir', required=True, help='Folder of photos, or a video file')
@click.option('--outdir', required=True, type=click.Path(file_okay=False), help='Output folder')
@click.option('--mode', type=click.Choice(['dataset', 'driving']), default='dataset', show_default=True, help='Training dataset or reenactment driving folder')
@click.option('--flame', 'flame_dir', default=None, help='Folder with FLAME generic_model.pkl + landmark_embedding.npy [default: bundled head model]')
@click.option('--landmarks', 'landmark_dir', default=None, help='Folder of <stem>.txt landmark files (5 or 68 lines "x y", pixel indices; video frame i: <i:05d>.txt)')
@click.option('--recon-mat', 'mat_dir', default=None, help="Folder of Deep3DFaceRecon <stem>.mat results: their head angles are kept")
@click.option('--fps', type=click.FloatRange(min=0, min_open=True), default=None, help='Video: keep about this many frames per second [default: all]')
@click.option('--mirror', is_flag=True, help='Also write left-right mirrored copies (dataset mode)')
@click.option('--resolution', type=click.IntRange(min=8), default=512, show_default=True, help='Output image size')
@click.option('--threads', type=click.IntRange(min=1), default=1, show_default=True, help='torch CPU threads (small fits are fastest on one)')
@cli.user_errors
def main(indir, outdir, mode, flame_dir, landmark_dir, mat_dir, fps, mirror, resolution, threads):
    """Preprocess in-the-wild photos or a video (see the module docstring)."""
    torch.set_num_threads(threads)
    if mirror and mode == 'driving':
        raise click.ClickException('--mirror makes sense for a dataset only')
    if fps is not None and os.path.isdir(indir):
        raise click.ClickException(f'--fps applies to a video; {indir} is a folder of photos')
    detector = None
    if landmarks.detector_available():
        detector = landmarks.DlibLandmarkDetector()
    elif landmark_dir is None:
        raise click.ClickException(f'no landmark detector installed and no --landmarks folder given: {landmarks.INSTALL_HINT}')
    frames, count, video = list_frames(indir, fps)
    model = load_model(flame_dir)
    os.makedirs(outdir, exist_ok=True)
    writer = OutputWriter(mode, outdir, resolution, model.flame.faces)
    start = time.time()

    def fit_and_write(batch: List[Prepared]):
        result = fit(model, batch, resolution, video)
        writer.add(batch, result, mirrored=False)
        if mirror:
            flipped = [mirror_prepared(p) for p in batch]
            writer.add(flipped, fit(model, flipped, resolution, video, mirrored_of=result), mirrored=True)

    # Photos are processed one by one; a video's frames are fitted together (shared shape).
    prepared, skipped, n_inputs = [], [], 0
    for frame in tqdm(frames, total=count, desc='video frames' if video else 'photos', disable=None):
        n_inputs += 1
        try:
            item = prepare(frame, detector, landmark_dir, mat_dir, resolution)
            if video:
                prepared.append(item)
            else:
                fit_and_write([item])
        except (ValueError, RuntimeError) as e:
            skipped.append((frame.name, str(e)))
    if prepared:
        if len({len(p.points) for p in prepared}) > 1:
            # One batch needs one landmark layout: fall back to the five points for all frames.
            prepared = [p._replace(points=p.points if len(p.points) == 5 else alignment.landmarks_68_to_5(p.points)) for p in prepared]
        print(f'fitting {len(prepared)} frames together')
        fit_and_write(prepared)
    writer.finish(skipped)

    elapsed = time.time() - start
    print(f'{n_inputs} inputs: {n_inputs - len(skipped)} processed, {len(skipped)} skipped (see skipped.txt); '
          f'{len(writer.labels)} outputs in {outdir}')
    for n, why in skipped:
        print(f'  skipped {n}: {why}')
    if writer.errors:
        print(f'landmark error (pixels at 512): mean {np.mean(writer.errors):.2f}, max {np.max(writer.errors):.2f}; '
              f'{elapsed / max(1, n_inputs):.2f} s per input')
    if not writer.labels:
        raise click.ClickException('no face was processed')


if __name__ == '__main__':
    main()
