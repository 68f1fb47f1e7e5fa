"""Fit a FLAME-format head model and the camera to 2D landmarks in the EG3D crop.

What is fitted, per image: the head pose in Deep3DFaceRecon's parametrisation (angles,
translation t_x, t_y; t_z is fixed to 0 because after EG3D's radius normalisation it
only changes the camera distance, which the scale already covers), a scale of the mesh
about the world origin, the expression coefficients and the jaw pose; the shape
coefficients are shared by all images of one identity (`groups`). Eye pose stays zero:
the 68 iBUG landmarks do not see the eyeballs.

The camera is the label that the pose gives through EG3D's conversion (`pose_label.py`),
so what is minimised is exactly the error that the dataset will have: the model's 68
landmarks, moved into the world with `coords.mesh_to_world` and the scale, projected with
the image's label (focal 4.2647, principal point 0.5), against the detected points in the
crop. Results live in the canonical mesh space of SPEC section 2 (head rotation removed,
it is in the camera); the scale is applied to the written mesh so that mesh, label and
image agree.

Loss (pixels measured at 512 whatever the crop size):
    mean squared landmark error (px^2)
  + shape_prior |shape|^2 + expression_prior |exp|^2 + jaw_prior |jaw|^2 (jaw y, z x10)
  + scale_prior log(scale)^2
  + smoothness * mean squared change between consecutive frames (videos), measured in
    the optimiser's units (about a pixel each, see below).
Coefficients are in units of standard deviations for FLAME and our head model.
Optimised with L-BFGS (strong Wolfe line search): first the camera with the mean shape,
then everything together. Every variable is scaled so that one optimiser unit moves the
landmarks by about a pixel (`HeadModelAdapter.sensitivity`, CAMERA_STEP): without it the
coefficients, which differ 10x in effect, and the camera (~200 px per radian) make a
badly conditioned problem that L-BFGS crawls through.

Sub-pixel fits do not make the pose unique: on synthetic heads with random shape and
expression, identity and yaw trade off by up to ~2 degrees (see the tests); several
images of one identity (a video) constrain it better.

Performance: use torch.set_num_threads(1) for these small problems; on a loaded CPU
the thread pool's synchronisation makes each step many times slower.
"""

import dataclasses
from typing import Optional, Tuple

import numpy as np
import torch

from training import coords
from training.mesh.lbs import linear_blend_skinning

from dataset_preprocessing import alignment, pose_label

REFERENCE_SIZE = 512         # errors and priors are in pixels of a 512 crop
CAMERA_STEP = 0.005          # optimiser unit of the camera variables: radians, decimetres, log scale (see fit_head)


@dataclasses.dataclass
class FitResult:
    """Per image (B of them); float32/float64 numpy arrays.

    angles (B, 3) radians and trans (B, 3): Deep3DFaceRecon pose; labels (B, 25): EG3D
    camera labels; scale (B,); shape (B, S), expression (B, E), jaw_pose (B, 3) axis-angle
    radians; vertices (B, V, 3) and landmarks (B, 68, 3): canonical mesh metres with the
    scale applied (the canonical, yaw-0 contour); projected (B, K, 2): the fitted points
    in crop pixels (with the contour of the head's yaw);
    error_px (B,): mean landmark distance in pixels at 512.
    """
    angles: np.ndarray
    trans: np.ndarray
    labels: np.ndarray
    scale: np.ndarray
    shape: np.ndarray
    expression: np.ndarray
    jaw_pose: np.ndarray
    vertices: np.ndarray
    landmarks: np.ndarray
    projected: np.ndarray
    error_px: np.ndarray


class HeadModelAdapter:
    """A FLAME-format layer seen as (shape, expression, jaw_pose) -> canonical mesh.

    `flame` is a `training.mesh.flame.FlameModel` (the user's FLAME or our head model).
    Global pose, neck, eyes and translation are zero: that is the canonical space.
    Calling it gives vertices (B, V, 3) and landmarks (B, 68, 3); `landmarks` gives the
    landmarks alone through the ~200 vertices they sit on (the same numbers, what the
    fit's hundreds of steps need: the full mesh is ~25x more work).
    """

    def __init__(self, flame):
        if not flame.has_landmarks:
            raise ValueError('the head model has no landmark embedding (landmark_embedding.npy)')
        self.flame = flame
        self.n_shape = int(flame.n_shape)
        self.n_exp = int(flame.n_exp)
        # Contour points 0-16: FLAME's DECA-style embedding picks them by head yaw (79 bins);
        # our head model and 'full' embeddings have one set. Points 17-67 are fixed.
        if flame.dynamic_contour:
            contour_faces, contour_bary = flame.dynamic_faces_idx, flame.dynamic_bary          # (79, 17), (79, 17, 3)
        else:
            contour_faces, contour_bary = flame.lmk_faces_idx[None, :17], flame.lmk_bary[None, :17]
        inner_faces = flame.lmk_faces_idx[17:]
        corners = torch.cat([flame.faces[contour_faces].reshape(-1), flame.faces[inner_faces].reshape(-1)])
        used, index = torch.unique(corners, return_inverse=True)
        n_contour = contour_faces.numel() * 3
        self._contour_tri = index[:n_contour].reshape(len(contour_faces), 17, 3)
        self._contour_bary = contour_bary
        self._inner_tri = index[n_contour:].reshape(51, 3)
        self._inner_bary = flame.lmk_bary[17:]
        n_used, n_joints = len(used), flame.J_regressor.shape[0]
        # Joints depend on all vertices, but linearly: fold the regressor into the blendshapes and
        # append the joints as extra "vertices" that the reduced regressor just selects.
        self._v_template = torch.cat([flame.v_template[used], flame.J_regressor @ flame.v_template])
        self._shapedirs = torch.cat([flame.shapedirs[used], torch.einsum('jv,vck->jck', flame.J_regressor, flame.shapedirs)])
        self._j_select = torch.cat([torch.zeros(n_joints, n_used), torch.eye(n_joints)], dim=1)
        joint_weights = torch.zeros(n_joints, n_joints)
        joint_weights[:, 0] = 1
        self._weights = torch.cat([flame.lbs_weights[used], joint_weights])
        self._posedirs = torch.cat([flame.posedirs[used], torch.zeros(n_joints, *flame.posedirs.shape[1:])])
        self._sensitivity = None

    def sensitivity(self) -> torch.Tensor:
        """(n_shape + n_exp + 3,) RMS image motion of the landmarks per unit of each shape,
        expression and jaw coefficient, in pixels at 512 for a frontal view (finite
        differences at the mean face; used to precondition the fit)."""
        if self._sensitivity is None:
            n = self.n_shape + self.n_exp + 3
            eps = 1e-3
            with torch.no_grad():
                steps = torch.cat([torch.zeros(1, n), eps * torch.eye(n)])
                lms = self.landmarks(steps[:, :self.n_shape], steps[:, self.n_shape:-3], steps[:, -3:])
            motion = (lms[1:, :, :2] - lms[:1, :, :2]) / eps                          # metres per unit
            px_per_metre = coords.FOCAL_LENGTH * REFERENCE_SIZE * coords.MESH_TO_WORLD_SCALE / coords.CAMERA_RADIUS
            self._sensitivity = motion.square().sum(-1).mean(-1).sqrt() * px_per_metre
        return self._sensitivity

    def _pose(self, jaw_pose: torch.Tensor) -> torch.Tensor:
        pose = torch.zeros(len(jaw_pose), 5, 3, dtype=jaw_pose.dtype)
        return torch.cat([pose[:, :2], jaw_pose[:, None], pose[:, 3:]], dim=1)

    def __call__(self, shape: torch.Tensor, expression: torch.Tensor, jaw_pose: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        zeros3 = torch.zeros_like(jaw_pose)
        return self.flame(shape, expression, zeros3, zeros3, jaw_pose, torch.zeros(len(jaw_pose), 6), zeros3)

    def contour_bins(self, yaw: torch.Tensor) -> torch.Tensor:
        """(B,) head yaw in radians (rotation about the head's +y, as seen by the camera) ->
        (B,) contour bins: DECA's layout (0..39 for 0..-39 degrees, 40..78 for 1..39), as
        `FlameModel.landmarks`; always 0 for models with one contour."""
        if len(self._contour_tri) == 1:
            return torch.zeros(len(yaw), dtype=torch.int64)
        deg = torch.round(torch.rad2deg(-yaw)).clamp(-39, 39).long()
        return torch.where(deg >= 0, deg, 39 - deg)

    def landmarks(self, shape: torch.Tensor, expression: torch.Tensor, jaw_pose: torch.Tensor,
                  bins: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 68, 3) canonical landmarks, equal to `self(...)[1]` for bins None (= 0, the
        canonical pose's contour); `bins` (B,) picks the contour for a yawed head."""
        betas = torch.cat([shape, expression], dim=1)
        v = self._v_template + (betas[:, None, None, :] * self._shapedirs).sum(-1)
        v, _ = linear_blend_skinning(v, self._pose(jaw_pose), self._j_select, self.flame.parents, self._weights, self._posedirs)
        bins = torch.zeros(len(v), dtype=torch.int64) if bins is None else bins
        bidx = torch.arange(len(v))[:, None]
        contour = (self._contour_bary[bins][..., None] * v[bidx[..., None], self._contour_tri[bins]]).sum(2)
        inner = (self._inner_bary[..., None] * v[:, self._inner_tri]).sum(2)
        return torch.cat([contour, inner], dim=1)


def _scaled_world(lms: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return coords.mesh_to_world(lms) * scale[:, None, None]


def scale_mesh(points: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Canonical mesh points (B, N, 3) scaled about the world origin: world_to_mesh(s mesh_to_world(p))."""
    shift = np.asarray(coords.MESH_SHIFT)
    return (np.asarray(points) + shift) * np.asarray(scale)[:, None, None] - shift


def project_landmarks(lms_mesh: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor, size: float) -> torch.Tensor:
    """Canonical points (B, N, 3) -> crop pixels (B, N, 2) of a `size` crop with labels (B, 25).

    The same pinhole as `rasterize.project_perspective` (the tests compare them), written
    with broadcasting instead of a batched matmul: even a (1, 3, 68) @ (1, 68, 3) bmm
    enters the CPU thread pool, which on a busy machine costs ~30 ms per call with 2
    threads (vs 5 us with 1), while element-wise ops on tiny tensors stay single-threaded.
    """
    cam2world, intr = coords.split_label(labels.to(lms_mesh.dtype))
    rel = _scaled_world(lms_mesh, scale) - cam2world[:, None, :3, 3]
    cam = (rel[..., :, None] * cam2world[:, None, :3, :3]).sum(-2)        # R^T (p - o)
    x, y = cam[..., 0] / cam[..., 2], cam[..., 1] / cam[..., 2]
    u = intr[:, None, 0, 0] * x + intr[:, None, 0, 1] * y + intr[:, None, 0, 2]
    v = intr[:, None, 1, 1] * y + intr[:, None, 1, 2]
    return torch.stack([u, v], dim=-1) * size


def initial_angles(points_2d: np.ndarray, model_points: np.ndarray) -> np.ndarray:
    """Head angles (3,) from an affine fit of 3D model points (K, 3) to image points (K, 2).

    The affine's rows, normalised and orthogonalised, are the first two rows of the head
    rotation as Deep3DFaceRecon's camera sees it (x right, y up; image y is down).
    """
    x = np.concatenate([model_points, np.ones([len(model_points), 1])], axis=1)
    a = np.linalg.lstsq(x, points_2d, rcond=None)[0][:3].T          # (2, 3)
    r1 = a[0] / np.linalg.norm(a[0])
    r2 = -a[1] - np.dot(-a[1], r1) * r1
    r2 /= np.linalg.norm(r2)
    rot = np.stack([r1, r2, np.cross(r1, r2)])
    return pose_label.matrix_to_deep3d_angles(rot)


def fit_head(model: HeadModelAdapter,
             points_2d: np.ndarray,                  # (B, K, 2) landmarks in crop pixels
             size: int,                              # crop size in pixels
             groups: np.ndarray = None,              # (B,) identity index per image: shape shared within a group; None: one per image
             point_weights: np.ndarray = None,       # (K,) weight of each landmark in the data term; None: all 1
             landmark_matrix: np.ndarray = None,     # (K, 68): detected point k = sum_j M[k, j] landmark j; None: identity (K = 68)
             fixed_angles: np.ndarray = None,        # (B, 3): keep these head angles (e.g. Deep3DFaceRecon's), fit the rest
             fixed_labels: np.ndarray = None,        # (B, 25): keep these cameras (mirrored copies); None: fit the camera
             fixed_scale: np.ndarray = None,         # (B,): with fixed_labels, keep this scale too; None: fit it
             shape_prior: float = 1e-2,              # weights of the priors, see module doc
             expression_prior: float = 1e-2,
             jaw_prior: float = 1.0,
             scale_prior: float = 10.0,
             smoothness: float = 0.0,                # consecutive-frame smoothing (videos; images in order)
             rigid_iters: int = 30,                  # L-BFGS iterations, camera only
             full_iters: int = 100,                  # L-BFGS iterations, everything
             ) -> FitResult:
    """Fit pose, scale and the model's coefficients to landmarks; see the module doc."""
    pts = torch.as_tensor(np.asarray(points_2d, dtype=np.float32))
    if pts.ndim != 3 or pts.shape[-1] != 2 or not torch.isfinite(pts).all():
        raise ValueError(f'points_2d must be (B, K, 2) finite, got {tuple(pts.shape)}')
    bsz, k = pts.shape[:2]
    lm_mat = torch.eye(68) if landmark_matrix is None else torch.as_tensor(np.asarray(landmark_matrix, np.float32))
    if lm_mat.shape != (k, 68):
        raise ValueError(f'landmark_matrix must be ({k}, 68), got {tuple(lm_mat.shape)}')
    weights = torch.ones(k) if point_weights is None else torch.as_tensor(np.asarray(point_weights, np.float32))
    if weights.shape != (k,):
        raise ValueError(f'point_weights must be ({k},), got {tuple(weights.shape)}')
    weights = weights * (k / weights.sum())             # keep the data term's scale: priors mean the same
    groups = np.arange(bsz) if groups is None else np.asarray(groups)
    _, group_idx = np.unique(groups, return_inverse=True)
    group_idx = torch.as_tensor(group_idx.reshape(-1))
    n_groups = int(group_idx.max()) + 1
    px = REFERENCE_SIZE / size                      # crop pixels -> pixels at 512

    # Every variable is optimised in units that move the landmarks by about a pixel (or cost
    # as much in the prior), so that L-BFGS sees a well-conditioned problem: the model's
    # coefficients differ 10x in effect, the camera moves ~200 px per radian or decimetre.
    sens = model.sensitivity()
    priors = torch.cat([torch.full([model.n_shape], shape_prior), torch.full([model.n_exp], expression_prior),
                        jaw_prior * torch.tensor([1.0, 100.0, 100.0])])
    unit = 1 / (sens.square() + priors).sqrt()
    shape_var = torch.zeros(n_groups, model.n_shape, requires_grad=True)
    exp_var = torch.zeros(bsz, model.n_exp, requires_grad=True)
    jaw_var = torch.zeros(bsz, 3, requires_grad=True)

    def coefficients_now():
        shape = (shape_var * unit[:model.n_shape])[group_idx]
        return shape, exp_var * unit[model.n_shape:-3], jaw_var * unit[-3:]

    fit_angles = fixed_labels is None and fixed_angles is None
    fit_trans = fixed_labels is None
    fit_scale = fixed_labels is None or fixed_scale is None
    if fixed_labels is not None:
        fixed = torch.as_tensor(np.asarray(fixed_labels, np.float32))
        if fixed.shape != (bsz, 25):
            raise ValueError(f'fixed_labels must be ({bsz}, 25), got {tuple(fixed.shape)}')
    if fixed_angles is not None:
        angles0 = np.asarray(fixed_angles, dtype=np.float32)
        if angles0.shape != (bsz, 3):
            raise ValueError(f'fixed_angles must be ({bsz}, 3), got {angles0.shape}')
    else:
        with torch.no_grad():
            model_pts = alignment.world_to_alignment_units(coords.mesh_to_world(model.landmarks(*coefficients_now())).numpy())
        angles0 = np.stack([initial_angles(pts[i].numpy(), lm_mat.double().numpy() @ model_pts[i]) for i in range(bsz)])
    angles0 = torch.as_tensor(angles0, dtype=torch.float32)
    log_scale0 = torch.zeros(bsz) if fixed_scale is None else torch.log(torch.as_tensor(np.asarray(fixed_scale), dtype=torch.float32))
    angles_var = torch.zeros(bsz, 3, requires_grad=fit_angles)
    trans_var = torch.zeros(bsz, 2, requires_grad=fit_trans)
    scale_var = torch.zeros(bsz, requires_grad=fit_scale)

    def camera_now():
        """-> angles (B, 3), translation (B, 3), log scale (B,), labels (B, 25)."""
        angles = angles0 + CAMERA_STEP * angles_var
        trans = torch.cat([CAMERA_STEP * trans_var, torch.zeros(bsz, 1)], dim=1)
        log_scale = log_scale0 + CAMERA_STEP * scale_var
        labels = fixed if fixed_labels is not None else pose_label.pose_to_label(angles, trans)
        return angles, trans, log_scale, labels

    def head_yaw():
        if fixed_labels is not None:
            return torch.tensor([pose_label.cam2world_to_head_angles(m)[1] for m in coords.split_label(fixed)[0].numpy()])
        return camera_now()[0][:, 1].detach()

    # The contour bin (FLAME's yaw-dependent jaw line) is chosen from the pose before each
    # stage and kept during it: switching inside L-BFGS would make the loss jump.
    bins = model.contour_bins(head_yaw())

    def smooth_term(x):
        """Mean squared change between consecutive frames, in optimiser units (~pixels)."""
        return ((x[1:] - x[:-1]) ** 2).sum(-1).mean()

    def loss_fn(rigid: bool):
        angles, trans, log_scale, labels = camera_now()
        shape, exp, jaw = coefficients_now()
        lms = model.landmarks(shape, exp, jaw, bins)
        proj = project_landmarks(lm_mat @ lms, log_scale.exp(), labels, size)
        loss = ((((proj - pts) * px) ** 2).sum(-1) * weights).mean()
        loss = loss + scale_prior * (log_scale ** 2).mean()
        if not rigid:
            loss = loss + shape_prior * (shape_var * unit[:model.n_shape]).square().sum(-1).mean() + expression_prior * exp.square().sum(-1).mean()
            loss = loss + jaw_prior * ((jaw * torch.tensor([1.0, 10.0, 10.0])) ** 2).sum(-1).mean()
        if smoothness > 0 and bsz > 1:
            # Camera values, not variables: the variables start from per-frame initial angles.
            loss = loss + smoothness * sum(smooth_term(t) for t in (exp_var, jaw_var, angles / CAMERA_STEP, trans / CAMERA_STEP))
        return loss

    def run(params, rigid, iters):
        if iters <= 0 or not params:
            return
        opt = torch.optim.LBFGS(params, lr=1, max_iter=iters, history_size=20, line_search_fn='strong_wolfe',
                                tolerance_grad=1e-7, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            loss = loss_fn(rigid)
            loss.backward()
            return loss
        opt.step(closure)

    camera = [v for v, on in ((angles_var, fit_angles), (trans_var, fit_trans), (scale_var, fit_scale)) if on]
    run(camera, True, rigid_iters)
    bins = model.contour_bins(head_yaw())
    run(camera + [shape_var, exp_var, jaw_var], False, full_iters)

    with torch.no_grad():
        angles, trans, log_scale, labels = camera_now()
        scale = log_scale.exp()
        shape, exp, jaw = coefficients_now()
        verts, lms = model(shape, exp, jaw)
        proj = project_landmarks(lm_mat @ model.landmarks(shape, exp, jaw, bins), scale, labels, size)
        err = ((proj - pts) * px).norm(dim=-1).mean(-1)
        ang, trans = angles.numpy(), trans.numpy()
        if fixed_labels is not None:            # the pose behind a given label is not a Deep3DFaceRecon one
            ang = np.stack([pose_label.cam2world_to_head_angles(m) for m in coords.split_label(fixed)[0].numpy()])
            trans = np.full([bsz, 3], np.nan, dtype=np.float32)
    scale_np = scale.numpy()
    return FitResult(angles=ang, trans=trans, labels=labels.numpy(), scale=scale_np,
                     shape=shape.numpy(), expression=exp.numpy(), jaw_pose=jaw.numpy(),
                     vertices=scale_mesh(verts.numpy(), scale_np).astype(np.float32),
                     landmarks=scale_mesh(lms.numpy(), scale_np).astype(np.float32),
                     projected=proj.numpy(), error_px=err.numpy())
