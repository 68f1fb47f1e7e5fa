"""The tri-plane decoder: a small MLP from plane features to colour features and density."""

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence


@persistence.persistent_class
class FullyConnectedLayer(torch.nn.Module):
    """Linear layer with an equalized learning rate, as in StyleGAN2.

    The weight is stored divided by `lr_multiplier` and scaled back at run time by
    lr_multiplier / sqrt(in_features), so every layer learns at the same speed under Adam
    whatever its fan-in, and `lr_multiplier` sets its speed relative to the others.
    """

    def __init__(self,
        in_features: int,               # Input width.
        out_features: int,              # Output width.
        bias: bool = True,              # Add a learned bias?
        lr_multiplier: float = 1.0,     # Learning-rate multiplier of this layer.
        bias_init: float = 0.0,         # Initial value of the bias.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        w = self.weight.to(x.dtype) * self.weight_gain
        b = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        return torch.nn.functional.linear(x, w, b)

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}, lr_multiplier={self.bias_gain:g}'


@persistence.persistent_class
class OSGDecoder(torch.nn.Module):
    """Mean of the three plane features -> FC -> softplus -> FC -> (sigma, colour features).

    Colour features go through a sigmoid widened by 0.001 on each side, so that the
    composited image can reach exactly 0 and 1 (-1 and 1 after the renderer's mapping).
    The view direction is accepted for the renderer's interface but not used.
    """

    def __init__(self,
        n_features: int = 32,           # Channels per plane.
        hidden_dim: int = 64,           # Width of the hidden layer.
        decoder_output_dim: int = 32,   # Colour features out (the first 3 are RGB).
        decoder_lr_mul: float = 1.0,    # Learning-rate multiplier of both layers.
    ):
        super().__init__()
        self.n_features = n_features
        self.decoder_output_dim = decoder_output_dim
        self.net = torch.nn.Sequential(
            FullyConnectedLayer(n_features, hidden_dim, lr_multiplier=decoder_lr_mul),
            torch.nn.Softplus(),
            FullyConnectedLayer(hidden_dim, 1 + decoder_output_dim, lr_multiplier=decoder_lr_mul),
        )

    def forward(self, sampled_features: torch.Tensor, ray_directions: torch.Tensor) -> dict:
        """Decode plane samples.

        Args:
            sampled_features: (B, 3, N, n_features) from renderer.sample_from_planes.
            ray_directions:   (B, N, 3), unused.
        Returns:
            dict(rgb=(B, N, decoder_output_dim) in [-0.001, 1.001], sigma=(B, N, 1) raw density).
        """
        misc.assert_shape(sampled_features, [None, 3, None, self.n_features], 'sampled_features')
        out = self.net(sampled_features.mean(dim=1))
        rgb = torch.sigmoid(out[..., 1:]) * (1 + 2 * 0.001) - 0.001
        return dict(rgb=rgb, sigma=out[..., 0:1])
