"""Whether generated faces follow the driving mesh: landmarks, head pose, expression and jaw.

Protocol (Next3D's AED and APD, EG3D's pose accuracy, with estimators that run offline):
each sample draws z, a camera label c and a driving mesh v (vertices + its 68 canonical
landmarks) from the dataset, as FID does; G renders image = G(z, c, v); dlib's 68
landmarks are detected on the image (`face_analysis`). Images without a detected face are
left out and counted (`*_faces`: the fraction with a face). Three numbers per image:

lmk  Mean distance between the detected landmarks and the driving landmarks projected with
     c, over the 51 inner points (brows, nose, eyes, mouth), in pixels at 512 (distances
     scaled by 512 / image size). `*_68` is the same over all 68 points: dlib's jaw line
     follows the silhouette, the mesh's is a fixed curve on the surface (a bias even for
     a perfect generator).
apd  Head pose (EG3D's pose accuracy): the camera (rotation, translation, scale, with c's
     intrinsics) that best projects the driving mesh's inner landmarks onto the detected
     ones (least squares in pixels), against c: the angle of the relative rotation, in
     degrees. EG3D estimates the pose with a face reconstruction network; here the 3D
     points are the ones the generator was asked to follow, so only the pose is fitted.
aed  Expression (Next3D's AED): the bundled head model (`fit_flame.fit_head`, camera free,
     inner points) is fitted to the landmarks detected on the generated image and, with the
     same settings, to those detected on the dataset image that the driving mesh was made
     for. Mean absolute difference of the expression coefficients (units: the model's
     standard deviations); `*_jaw`: the angle between the two fitted jaw rotations, in
     degrees. Next3D too estimated both sides with one estimator (DECA): its bias cancels.
     (Fitting the mesh's own landmarks instead would not: on the synthetic renders dlib's
     lips part ~30% less than the mesh's, so a perfect generator would show a jaw error.)
     The bundled model's expression components move the landmarks by 0.4-4 px at 512 per
     unit, less than dlib's noise: single coefficients are poorly identified (a smile of 1.5
     is seen as ~0.5, the rest spreads over other coefficients); the jaw (83 px per radian)
     is measured well. A dataset image without a face leaves its sample out.

Each estimator has a floor even for a perfect generator (dlib's landmarks are a few pixels
off; the measured values are in docs/EVALUATION.md): compare models with the same metric,
not with published values.

Samples: z, camera labels and driving meshes drawn with seed 2 (`metric_utils.iterate_generator_inputs`),
G's random depth samples from a generator seeded with RENDER_SEED: the value repeats exactly
for the same count and batch size.
"""

import copy

import numpy as np
import torch

from dataset_preprocessing import alignment, fit_flame, pose_label
from metrics import face_analysis
from metrics import metric_utils
from training import coords
from training.mesh.head_model import load_head_model
from training.mesh.lbs import axis_angle_to_matrix

REFERENCE_SIZE = 512            # landmark distances are reported in pixels at this size
EXPRESSION_PRIOR = 1.0          # fit_head's expression prior (its default 0.01 is for exact points): with dlib's
                                # landmarks the coefficients fitted to synthetic renders were 0.4 model units from
                                # the truth on average with 1.0, 1.7 with 0.01
POSE_ITERS = 50                 # L-BFGS iterations of the pose fit
RENDER_SEED = 0                 # of the renderer's random depth samples (`metric_utils.render_generator`)


def _inner_weights() -> np.ndarray:
    w = np.zeros(68)
    w[face_analysis.INNER] = 1
    return w


def project(lms: torch.Tensor, labels: torch.Tensor, size: int) -> np.ndarray:
    """Canonical points (N, K, 3) seen by cameras (N, 25) -> (N, K, 2) continuous pixels of a `size` image."""
    lms = torch.as_tensor(lms, dtype=torch.float32)
    return fit_flame.project_landmarks(lms, torch.ones(len(lms)), torch.as_tensor(labels, dtype=torch.float32), size).numpy()


def landmark_distance(detected: np.ndarray, projected: np.ndarray, size: int) -> np.ndarray:
    """(N, K, 2) and (N, K, 2) pixels of a `size` image -> (N,) mean distance in pixels at 512."""
    return np.linalg.norm(detected - projected, axis=-1).mean(-1) * (REFERENCE_SIZE / size)


def rotation_angle_deg(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Angle (N,) in degrees of the rotation between (N, 3, 3) rotations a and b."""
    rel = a.double().transpose(1, 2) @ b.double()
    skew = torch.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]], dim=1)
    cos2 = rel.diagonal(dim1=1, dim2=2).sum(-1) - 1
    return torch.rad2deg(torch.atan2(skew.norm(dim=1), cos2)).numpy()


def estimate_camera(points_3d: torch.Tensor, points_2d: np.ndarray, labels: torch.Tensor, size: int) -> torch.Tensor:
    """The cameras (N, 25) that project canonical points (N, K, 3) closest to pixels (N, K, 2).

    Head angles and translation in Deep3DFaceRecon's parametrisation (`pose_label`) plus a
    scale, as `fit_flame.fit_head` fits them, with the intrinsics of `labels` (N, 25);
    least squares in pixels at 512, L-BFGS from the affine estimate of the angles.
    """
    points_3d = torch.as_tensor(points_3d, dtype=torch.float32)
    pts = torch.as_tensor(points_2d, dtype=torch.float32)
    n = len(points_3d)
    intr = coords.split_label(torch.as_tensor(labels, dtype=torch.float32))[1]
    model_pts = alignment.world_to_alignment_units(coords.mesh_to_world(points_3d).numpy())
    angles0 = torch.as_tensor(np.stack([fit_flame.initial_angles(points_2d[i], model_pts[i]) for i in range(n)]), dtype=torch.float32)
    # Optimiser units of ~a pixel each, as in fit_head.
    angles_var, trans_var, scale_var = (torch.zeros(n, k, requires_grad=True) for k in (3, 2, 1))

    def camera():
        angles = angles0 + fit_flame.CAMERA_STEP * angles_var
        trans = torch.cat([fit_flame.CAMERA_STEP * trans_var, torch.zeros(n, 1)], dim=1)
        return coords.make_label(pose_label.pose_to_cam2world(angles, trans), intr), (fit_flame.CAMERA_STEP * scale_var[:, 0]).exp()

    opt = torch.optim.LBFGS([angles_var, trans_var, scale_var], lr=1, max_iter=POSE_ITERS, history_size=20,
                            line_search_fn='strong_wolfe', tolerance_grad=1e-7, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        label, scale = camera()
        proj = fit_flame.project_landmarks(points_3d, scale, label, size)
        loss = (((proj - pts) * (REFERENCE_SIZE / size)) ** 2).sum(-1).mean(-1).sum()     # independent problems
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return camera()[0]


def pose_error(detected: np.ndarray, driving_lms: torch.Tensor, labels: torch.Tensor, size: int) -> np.ndarray:
    """(N,) degrees between c's rotation and the pose fitted to detected landmarks (N, 68, 2); see the module doc."""
    est = estimate_camera(driving_lms[:, face_analysis.INNER], detected[:, face_analysis.INNER], labels, size)
    return rotation_angle_deg(coords.split_label(est)[0][:, :3, :3], coords.split_label(torch.as_tensor(labels))[0][:, :3, :3])


def fit_expression(model: fit_flame.HeadModelAdapter, points_2d: np.ndarray, size: int) -> fit_flame.FitResult:
    """The head model fitted to (N, 68, 2) pixels of a `size` image (camera free, inner points)."""
    return fit_flame.fit_head(model, points_2d, size, point_weights=_inner_weights(), expression_prior=EXPRESSION_PRIOR)


def expression_difference(fit: fit_flame.FitResult, reference: fit_flame.FitResult):
    """(N,) mean |expression difference| (model units) and (N,) angle between the jaw rotations (degrees)."""
    exp = np.abs(fit.expression - reference.expression).mean(-1)
    jaw = rotation_angle_deg(axis_angle_to_matrix(torch.as_tensor(fit.jaw_pose)), axis_angle_to_matrix(torch.as_tensor(reference.jaw_pose)))
    return exp, jaw


def expression_error(model: fit_flame.HeadModelAdapter, detected: np.ndarray, size: int, reference: np.ndarray, reference_size: int):
    """`expression_difference` of the fits to landmarks (N, 68, 2) detected on generated images (`size` px)
    and on the reference (dataset) images (`reference_size` px)."""
    return expression_difference(fit_expression(model, detected, size), fit_expression(model, reference, reference_size))


# ----------------------------------------------------------------------------------------

METRICS = ('lmk', 'apd', 'aed')


def compute_control_errors(opts: metric_utils.MetricOptions, metric: str, name: str, num_gen: int) -> dict:
    """Mean errors over `num_gen` samples shared by the ranks; `metric` in METRICS, `name` the reported name.

    lmk -> {name: px at 512 (51 points), name_68: px at 512 (68 points)}; apd -> {name: degrees};
    aed -> {name: expression units, name_jaw: degrees}; each with name_faces: the fraction of
    generated images with a face (aed: of those whose dataset image has one).
    """
    assert metric in METRICS
    G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
    if getattr(G, 'num_vertices', None) is None:
        raise ValueError(f'{name} needs a mesh-driven (Next3D) generator')
    face_analysis.check_requirements(name, int(G.img_resolution))
    analyzer = face_analysis.FaceAnalyzer()
    model = fit_flame.HeadModelAdapter(load_head_model()) if metric == 'aed' else None
    keys = {'lmk': (name, f'{name}_68'), 'apd': (name,), 'aed': (name, f'{name}_jaw')}[metric]
    sums = torch.zeros(len(keys) + 2, dtype=torch.float64)            # per key, then faces, images
    generator = metric_utils.render_generator(opts, RENDER_SEED)
    inputs = metric_utils.iterate_generator_inputs(opts, opts.batch_size, seed=2, images=metric == 'aed')
    done = 0
    num_gen = (num_gen + opts.num_gpus - 1) // opts.num_gpus        # this rank's share
    while done < num_gen:
        z, c, v, *reals = next(inputs)
        n = min(opts.batch_size, num_gen - done)
        done += n
        z, c, v = z[:n], c[:n], v[:n]
        use = np.ones(n, dtype=bool)
        if metric == 'aed':             # the reference: the dataset image that the mesh was made for
            reference = analyzer.landmarks(reals[0][:n])
            use = np.isfinite(reference).all(axis=(1, 2))
            if not use.any():
                continue
        z, c, v = (x[torch.from_numpy(use).to(x.device)] for x in (z, c, v))
        with torch.no_grad():
            images = metric_utils.generate_images(G, z, c, v, generator=generator)
        size = images.shape[-1]
        detected = analyzer.landmarks(images)
        found = np.isfinite(detected).all(axis=(1, 2))
        sums[-2] += float(found.sum())
        sums[-1] += float(use.sum())
        if not found.any():
            continue
        detected = detected[found]
        labels = c.cpu()[found][:, :25].float()
        driving = v.cpu()[found][:, -68:].float()
        if metric == 'lmk':
            proj = project(driving, labels, size)
            values = [landmark_distance(detected[:, face_analysis.INNER], proj[:, face_analysis.INNER], size),
                      landmark_distance(detected, proj, size)]
        elif metric == 'apd':
            values = [pose_error(detected, driving, labels, size)]
        else:
            values = expression_error(model, detected, size, reference[use][found], reals[0].shape[-1])
        for k, value in enumerate(values):
            sums[k] += float(np.sum(value))
        if opts.progress and opts.rank == 0:
            print(f'  {name}: {done}/{num_gen} samples')
    inputs.close()
    if opts.num_gpus > 1:
        sums = sums.to(opts.device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    faces, images = float(sums[-2]), float(sums[-1])
    results = {key: float(sums[k]) / faces if faces > 0 else float('nan') for k, key in enumerate(keys)}
    results[f'{name}_faces'] = faces / images if images > 0 else 0.0
    return results
