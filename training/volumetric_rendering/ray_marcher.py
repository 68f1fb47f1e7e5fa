"""Alpha compositing of samples along rays (EG3D's mid-point rule).

Samples at depths t_0 < ... < t_{S-1} bound S - 1 intervals. Each interval j takes the
mean colour and mean raw density of its two end samples, an opacity
alpha_j = 1 - exp(-density_j * (t_{j+1} - t_j)), and the weight
w_j = alpha_j * prod_{k<j} (1 - alpha_k). The composite is sum_j w_j * colour_j, and the
depth is the weight-averaged interval mid-point.
"""

import torch

from torch_utils import misc

CLAMP_MODES = ('softplus',)


class MipRayMarcher2(torch.nn.Module):
    """Composite per-sample features and densities along each ray. No parameters."""

    def forward(self, colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, rendering_options: dict):
        """Mid-point alpha compositing.

        Args:
            colors:    (B, N, S, C) features per sample (the decoder's output, in [0, 1] for RGB).
            densities: (B, N, S, 1) raw densities (sigma before the activation).
            depths:    (B, N, S, 1) sample depths along the ray, increasing along S, world units
                       (distance from the ray origin for unit directions).
            rendering_options: reads `clamp_mode` ('softplus': density = softplus(sigma - 1))
                       and `white_back` (bool, default False: the empty part of a ray adds
                       white instead of black).
        Returns:
            rgb:     (B, N, C) composite, mapped from [0, 1] to [-1, 1] (x * 2 - 1) as EG3D does.
            depth:   (B, N, 1) expected depth, clamped per ray to [t_0, t_{S-1}]; a ray with zero
                     total weight gets t_{S-1} (EG3D: nan -> inf -> clamp).
            weights: (B, N, S - 1, 1) compositing weight of each interval; weights.sum(2) is
                     the ray's opacity.
        """
        misc.assert_shape(densities, [*colors.shape[:3], 1], 'densities')
        weights = self.interval_weights(densities, depths, rendering_options)
        rgb = self.composite(colors, self.sample_weights(weights))
        return self.finish(rgb, weights, depths, rendering_options)

    @staticmethod
    def sample_weights(weights: torch.Tensor) -> torch.Tensor:
        """Interval weights (B, N, S - 1, 1) -> per-sample weights (B, N, S): sum_j w_j (c_j + c_{j+1}) / 2
        regrouped per sample, so that the composite is one product with the colours (no
        (B, N, S - 1, C) temporaries for the wide feature channels)."""
        zero = torch.zeros_like(weights[:, :, :1])
        return ((torch.cat([weights, zero], dim=2) + torch.cat([zero, weights], dim=2)) / 2).squeeze(-1)

    @staticmethod
    def composite(colors: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
        """colors (B, N, S, C), sample_weights (B, N, S) -> sum over samples (B, N, C), one batched matrix product."""
        return _Composite.apply(colors, sample_weights)

    @staticmethod
    def finish(rgb: torch.Tensor, weights: torch.Tensor, depths: torch.Tensor, rendering_options: dict):
        """Composite colours (B, N, C), weights (B, N, S - 1, 1), sorted depths (B, N, S, 1) ->
        (rgb in [-1, 1], expected depth, weights), as `forward` returns them."""
        depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
        opacity = weights.sum(dim=2)
        has_weight = opacity > 0
        depth = (weights * depths_mid).sum(dim=2) / torch.where(has_weight, opacity, torch.ones_like(opacity))
        depth = torch.where(has_weight, depth, depths[:, :, -1])
        depth = torch.minimum(torch.maximum(depth, depths.amin(dim=2)), depths.amax(dim=2))

        if rendering_options.get('white_back', False):
            rgb = rgb + 1 - opacity
        rgb = rgb * 2 - 1
        return rgb, depth, weights

    def interval_weights(self, densities: torch.Tensor, depths: torch.Tensor, rendering_options: dict) -> torch.Tensor:
        """Compositing weights alone: densities, depths (B, N, S, 1) -> weights (B, N, S - 1, 1)."""
        misc.assert_shape(depths, list(densities.shape), 'depths')
        misc.assert_shape(densities, [None, None, None, 1], 'densities')
        if densities.shape[2] < 2:
            raise ValueError(f'MipRayMarcher2: need at least 2 samples per ray, got {densities.shape[2]}')
        clamp_mode = rendering_options.get('clamp_mode', 'softplus')
        if clamp_mode not in CLAMP_MODES:
            raise ValueError(f'MipRayMarcher2: unknown clamp_mode {clamp_mode!r}, expected one of {CLAMP_MODES}')
        deltas = depths[:, :, 1:] - depths[:, :, :-1]
        densities_mid = torch.nn.functional.softplus((densities[:, :, :-1] + densities[:, :, 1:]) / 2 - 1)
        alpha = 1 - torch.exp(-densities_mid * deltas)
        # Transmittance before each interval; the 1e-10 keeps cumprod's gradient finite when alpha = 1.
        survive = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], dim=2)
        transmittance = torch.cumprod(survive, dim=2)[:, :, :-1]
        return alpha * transmittance


class _Composite(torch.autograd.Function):
    """sum_s w[..., s] colors[..., s, :] as a batched matrix product, whose backward first
    makes the incoming gradient contiguous: the generator's gradient arrives as a
    transposed view (from its (B, C, H, W) image), and a batched matrix product with such
    an operand runs one small product per ray on the CPU (3x slower, 90,000 dispatched ops
    for one small128 image). The backward is made of differentiable ops (double backward works)."""

    @staticmethod
    def forward(ctx, colors: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(colors, sample_weights)
        return torch.matmul(sample_weights.unsqueeze(-2), colors).squeeze(-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        colors, sample_weights = ctx.saved_tensors
        grad = grad.contiguous().unsqueeze(-2)                                          # (B, N, 1, C)
        grad_colors = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_colors = sample_weights.unsqueeze(-1) * grad                          # (B, N, S, C)
        if ctx.needs_input_grad[1]:
            grad_weights = torch.matmul(grad, colors.transpose(-1, -2)).squeeze(-2)     # (B, N, S)
        return grad_colors, grad_weights
