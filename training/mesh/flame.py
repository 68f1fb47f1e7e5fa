"""The FLAME layer: shape, expression and pose parameters -> mesh vertices and 68 landmarks.

Works with FLAME's own `generic_model.pkl` (read without chumpy and without running code,
see `flame_pickle`) and with the project's procedural head model in the same format
(`data/head_model`, see `training.mesh.head_model`).

Joints (FLAME order): 0 global (root), 1 neck, 2 jaw, 3 eye_left, 4 eye_right. Output is
in the model's canonical space in metres (+x the subject's left, +y up, +z out of the face).
"""

from typing import Optional

import numpy as np
import torch

from training.mesh.flame_pickle import load_flame_pickle, load_landmark_embedding
from training.mesh.lbs import axis_angle_to_matrix, check_parents, linear_blend_skinning

# FLAME 2020 stores 300 identity then 100 expression components in shapedirs.
FLAME_2020_SHAPE_COMPONENTS = 300


class FlameModel(torch.nn.Module):
    """Batched, differentiable FLAME: all model arrays are buffers (move with .to(device))."""

    def __init__(self,
        model_path: str,                               # generic_model.pkl (FLAME or this project's head model)
        landmark_embedding_path: Optional[str] = None, # DECA-style landmark_embedding.npy; None: no landmarks
        n_shape: Optional[int] = None,                 # identity components used; None: all in the file
        n_exp: Optional[int] = None,                   # expression components used; None: all in the file
        shape_components_in_file: Optional[int] = None,# identity components stored before the expression ones;
                                                       # None: the file's 'n_shape_components', else 300 (FLAME 2020)
        dtype: torch.dtype = torch.float32,            # buffer dtype (float64 for gradcheck)
    ):
        super().__init__()
        model = load_flame_pickle(model_path)
        total = model['shapedirs'].shape[2]
        split = shape_components_in_file if shape_components_in_file is not None else model.get('n_shape_components')
        if split is None:
            if total <= FLAME_2020_SHAPE_COMPONENTS:
                raise ValueError(f'{model_path}: shapedirs has {total} components; pass shape_components_in_file '
                                 f'to say how many are identity components')
            split = FLAME_2020_SHAPE_COMPONENTS
        split = int(split)
        self.n_shape = split if n_shape is None else int(n_shape)
        self.n_exp = total - split if n_exp is None else int(n_exp)
        if not (0 <= self.n_shape <= split and 0 <= self.n_exp <= total - split):
            raise ValueError(f'{model_path}: holds {split} shape and {total - split} expression components, '
                             f'asked for {self.n_shape} and {self.n_exp}')
        self.parents = check_parents(model['kintree_table'][0])
        if len(self.parents) != 5:
            raise ValueError(f'{model_path}: FLAME has 5 joints, the kinematic tree has {len(self.parents)}')
        shapedirs = np.concatenate([model['shapedirs'][:, :, :self.n_shape],
                                    model['shapedirs'][:, :, split:split + self.n_exp]], axis=2)
        buf = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)
        self.register_buffer('v_template', buf(model['v_template']))                # (V, 3)
        self.register_buffer('shapedirs', buf(shapedirs))                           # (V, 3, n_shape + n_exp)
        self.register_buffer('posedirs', buf(model['posedirs']))                    # (V, 3, 36)
        self.register_buffer('J_regressor', buf(model['J_regressor']))              # (5, V)
        self.register_buffer('lbs_weights', buf(model['weights']))                  # (V, 5)
        self.register_buffer('faces', torch.as_tensor(model['f'], dtype=torch.int64))  # (F, 3)
        self.has_landmarks = landmark_embedding_path is not None
        if self.has_landmarks:
            self._init_landmarks(landmark_embedding_path, len(model['f']), dtype)

    def _init_landmarks(self, path, n_faces, dtype):
        emb = load_landmark_embedding(path)
        if 'full_lmk_faces_idx' in emb and 'full_lmk_bary_coords' in emb:
            faces_idx, bary = emb['full_lmk_faces_idx'][0], emb['full_lmk_bary_coords'][0]
            self.dynamic_contour = False
        else:
            # Static 51 points plus the 17-point contour chosen by head yaw (DECA's bins).
            faces_idx = np.concatenate([np.zeros(17, dtype=np.int64), emb['static_lmk_faces_idx']])
            bary = np.concatenate([np.zeros([17, 3], dtype=np.float32), emb['static_lmk_bary_coords']])
            self.dynamic_contour = True
            self.register_buffer('dynamic_faces_idx', torch.as_tensor(emb['dynamic_lmk_faces_idx']))
            self.register_buffer('dynamic_bary', torch.as_tensor(emb['dynamic_lmk_bary_coords'], dtype=dtype))
            if emb['dynamic_lmk_faces_idx'].max() >= n_faces:
                raise ValueError(f'{path}: dynamic landmark face index out of range ({n_faces} faces)')
        if faces_idx.max() >= n_faces or faces_idx.min() < 0:
            raise ValueError(f'{path}: landmark face index out of range [0, {n_faces})')
        self.register_buffer('lmk_faces_idx', torch.as_tensor(faces_idx, dtype=torch.int64))   # (68,)
        self.register_buffer('lmk_bary', torch.as_tensor(bary, dtype=dtype))                   # (68, 3)

    def extra_repr(self) -> str:
        return f'vertices={len(self.v_template)}, faces={len(self.faces)}, n_shape={self.n_shape}, n_exp={self.n_exp}'

    def landmarks(self, verts: torch.Tensor, rot_yaw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, V, 3) vertices -> (B, 68, 3) iBUG landmarks (barycentric points on faces).

        rot_yaw: (B,) head yaw in radians, used only by static+dynamic embeddings: the
        contour of bin round(-yaw in degrees) (DECA's layout: bins 0..39 for 0..39 degrees,
        40..78 for -1..-39 degrees).
        """
        faces_idx = self.lmk_faces_idx.expand(len(verts), -1)
        bary = self.lmk_bary.expand(len(verts), -1, -1)
        if self.dynamic_contour:
            deg = torch.round(torch.rad2deg(-rot_yaw)).clamp(-39, 39).long()
            bins = torch.where(deg >= 0, deg, 39 - deg)
            faces_idx = torch.cat([self.dynamic_faces_idx[bins], faces_idx[:, 17:]], 1)
            bary = torch.cat([self.dynamic_bary[bins], bary[:, 17:]], 1)
        tri = self.faces[faces_idx]                                                   # (B, 68, 3)
        corners = torch.gather(verts, 1, tri.reshape(len(verts), -1, 1).expand(-1, -1, 3)).reshape(len(verts), 68, 3, 3)
        return (bary[..., None] * corners).sum(2)

    def forward(self,
        shape: Optional[torch.Tensor] = None,          # (B, n_shape) identity coefficients
        expression: Optional[torch.Tensor] = None,     # (B, n_exp) expression coefficients
        global_pose: Optional[torch.Tensor] = None,    # (B, 3) axis-angle of the root joint
        neck_pose: Optional[torch.Tensor] = None,      # (B, 3) axis-angle of the neck joint
        jaw_pose: Optional[torch.Tensor] = None,       # (B, 3) axis-angle of the jaw (+x opens)
        eye_pose: Optional[torch.Tensor] = None,       # (B, 6) axis-angles of the left then right eye
        translation: Optional[torch.Tensor] = None,    # (B, 3) metres, added last
    ):
        """Returns vertices (B, V, 3) and landmarks (B, 68, 3) in metres (landmarks None
        when the model has no landmark embedding). Missing inputs are zeros; B comes from
        the first given input (1 if none)."""
        given = [t for t in (shape, expression, global_pose, neck_pose, jaw_pose, eye_pose, translation) if t is not None]
        bsz = given[0].shape[0] if given else 1
        ref = self.v_template
        def arg(t, width, name):
            if t is None:
                return ref.new_zeros(bsz, width)
            if t.shape != (bsz, width):
                raise ValueError(f'{name} must have shape ({bsz}, {width}), got {tuple(t.shape)}')
            return t.to(ref.dtype)
        betas = torch.cat([arg(shape, self.n_shape, 'shape'), arg(expression, self.n_exp, 'expression')], dim=1)
        pose = torch.cat([arg(global_pose, 3, 'global_pose'), arg(neck_pose, 3, 'neck_pose'),
                          arg(jaw_pose, 3, 'jaw_pose'), arg(eye_pose, 6, 'eye_pose')], dim=1).reshape(bsz, 5, 3)
        v_shaped = self.v_template + torch.einsum('bk,vck->bvc', betas, self.shapedirs)
        verts, _ = linear_blend_skinning(v_shaped, pose, self.J_regressor, self.parents, self.lbs_weights, self.posedirs)
        lms = None
        if self.has_landmarks:
            yaw = None
            if self.dynamic_contour:
                rot = axis_angle_to_matrix(pose[:, 0]) @ axis_angle_to_matrix(pose[:, 1])
                yaw = torch.atan2(rot[:, 0, 2], rot[:, 2, 2])
            lms = self.landmarks(verts, yaw)
        if translation is not None:
            t = arg(translation, 3, 'translation')[:, None]
            verts = verts + t
            lms = lms + t if lms is not None else None
        return verts, lms
