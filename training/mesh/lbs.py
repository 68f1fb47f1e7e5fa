"""Linear blend skinning for FLAME-style models (batched, differentiable, any device).

Conventions: rotations are axis-angle vectors (radians, right-hand rule) turned into
matrices that act on column vectors; joints form a tree given by `parents` with every
parent listed before its children (parents[0] = -1 for the root).
"""

import torch


def axis_angle_to_matrix(rvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: (..., 3) axis-angle -> (..., 3, 3) rotation matrices.

    R = I + a K + b K^2 with K the cross-product matrix of rvec, a = sin(t)/t and
    b = (1 - cos t)/t^2 (t = |rvec|); near t = 0 both use their Taylor series, so the
    result and its gradient are exact at zero rotation.
    """
    t2 = (rvec * rvec).sum(-1, keepdim=True)[..., None]              # (..., 1, 1)
    small = t2 < 1e-6
    t2_safe = torch.where(small, torch.ones_like(t2), t2)
    t_safe = t2_safe.sqrt()
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t_safe) / t_safe)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - torch.cos(t_safe)) / t2_safe)
    x, y, z = rvec.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).unflatten(-1, (3, 3))
    eye = torch.eye(3, dtype=rvec.dtype, device=rvec.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def check_parents(parents) -> list:
    """Validates a parent list (root first, parents before children); returns it as ints.

    The root's entry may hold any value (FLAME stores 4294967295, uint32's -1); it is
    returned as -1.
    """
    parents = [-1] + [int(p) for p in parents[1:]]
    for j, p in enumerate(parents[1:], start=1):
        if not 0 <= p < j:
            raise ValueError(f'joint {j} has parent {p}: parents must come before their children')
    return parents


def rigid_transforms(rot_mats: torch.Tensor, joints: torch.Tensor, parents: list):
    """Forward kinematics.

    rot_mats: (B, J, 3, 3) local rotation of each joint (about the joint).
    joints:   (B, J, 3) rest-pose joint positions.
    parents:  list of J parent indices (see `check_parents`).
    Returns posed joint positions (B, J, 3) and the relative transforms (B, J, 4, 4) that
    map rest-pose points to posed points for a vertex fully bound to each joint.
    """
    bsz, n_joints = joints.shape[:2]
    rel = joints.clone()
    rel[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = torch.cat([rot_mats, rel[..., None]], dim=-1)                            # (B, J, 3, 4)
    bottom = torch.tensor([0, 0, 0, 1], dtype=joints.dtype, device=joints.device).expand(bsz, n_joints, 1, 4)
    local = torch.cat([local, bottom], dim=-2)                                       # (B, J, 4, 4)
    chain = [local[:, 0]]
    for j in range(1, n_joints):
        chain.append(chain[parents[j]] @ local[:, j])
    world = torch.stack(chain, dim=1)                                                # (B, J, 4, 4)
    posed_joints = world[..., :3, 3]
    # Relative transform: undo the rest-pose joint position first, x -> G (x - j_rest).
    offset = (world[..., :3, :3] @ joints[..., None])[..., 0]
    relative = torch.cat([world[..., :3, :3], (posed_joints - offset)[..., None]], dim=-1)
    relative = torch.cat([relative, bottom], dim=-2)
    return posed_joints, relative


def linear_blend_skinning(v_shaped: torch.Tensor, pose: torch.Tensor, j_regressor: torch.Tensor,
                          parents: list, weights: torch.Tensor, posedirs: torch.Tensor = None):
    """Poses shaped vertices.

    v_shaped:    (B, V, 3) rest-pose vertices with shape/expression offsets applied.
    pose:        (B, J, 3) axis-angle per joint (joint 0 = root).
    j_regressor: (J, V) joints as linear combinations of vertices.
    parents:     list of J parent indices.
    weights:     (V, J) skinning weights (rows sum to 1).
    posedirs:    (V, 3, (J-1)*9) pose correctives, driven by the flattened (R - I) of
                 joints 1..J-1 in row-major order (FLAME's layout); None for none.
    Returns posed vertices (B, V, 3) and posed joints (B, J, 3).
    """
    joints = torch.einsum('jv,bvc->bjc', j_regressor, v_shaped)
    rot = axis_angle_to_matrix(pose)                                                 # (B, J, 3, 3)
    v_posed = v_shaped
    if posedirs is not None:
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).flatten(1)                                 # (B, (J-1)*9)
        v_posed = v_shaped + torch.einsum('bp,vcp->bvc', pose_feature, posedirs)
    posed_joints, relative = rigid_transforms(rot, joints, parents)
    blend = torch.einsum('vj,bjmn->bvmn', weights, relative)                         # (B, V, 4, 4)
    verts = (blend[..., :3, :3] @ v_posed[..., None])[..., 0] + blend[..., :3, 3]
    return verts, posed_joints
