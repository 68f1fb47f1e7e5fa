"""The tri-plane decoder: a small MLP from plane features to colour features and density."""

import torch

from torch_utils import misc
from torch_utils import persistence
from training.networks_stylegan2 import FullyConnectedLayer


@persistence.persistent_class
class OSGDecoder(torch.nn.Module):
    """Mean of the three plane features -> FC -> softplus -> FC -> (sigma, colour features).

    Both layers have StyleGAN2's equalized learning rate, scaled by `decoder_lr_mul`.

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
        batch_size, _, num_points, channels = sampled_features.shape
        out = self.net(sampled_features.mean(dim=1).reshape(batch_size * num_points, channels))   # 2D: one addmm per layer
        out = out.reshape(batch_size, num_points, -1)
        rgb = torch.sigmoid(out[..., 1:]) * (1 + 2 * 0.001) - 0.001
        return dict(rgb=rgb, sigma=out[..., 0:1])
