"""The tri-plane decoder: a small MLP from plane features to colour features and density."""

import torch

from torch_utils import misc
from torch_utils import persistence
from training.networks_stylegan2 import FullyConnectedLayer


def widened_sigmoid(x: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """sigmoid(x) * 1.002 - 0.001 (MipNeRF's widened sigmoid), as one lerp: one pass over x after the sigmoid."""
    return torch.lerp(x.new_tensor(-0.001), x.new_tensor(1.001), torch.sigmoid(x), out=out)


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
        return self.forward_plane_mean(sampled_features.mean(dim=1), ray_directions)

    def forward_plane_mean(self, features: torch.Tensor, ray_directions: torch.Tensor) -> dict:
        """Decode the mean of the three planes' samples, features (B, N, n_features) (from
        renderer.sample_plane_mean, which the renderer then uses); see forward."""
        misc.assert_shape(features, [None, None, self.n_features], 'features')
        batch_size, num_points, channels = features.shape
        x = features.reshape(batch_size * num_points, channels)
        needs_graph = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if x.device.type == 'cpu' and not needs_graph:
            sigma, rgb = self._decode_in_chunks(x)
        else:
            out = self.net(x)                                                    # 2D: one addmm per layer
            # split (not two slices): its backward writes the gradient once, without zero-filled copies.
            sigma, rgb = out.split([1, out.shape[1] - 1], dim=1)
            rgb = widened_sigmoid(rgb)
        return dict(rgb=rgb.reshape(batch_size, num_points, -1), sigma=sigma.reshape(batch_size, num_points, 1))

    @torch.no_grad()
    def _decode_in_chunks(self, x: torch.Tensor, chunk: int = 4096):
        """The same without autograd, a few thousand points at a time, so that the hidden
        activations (twice as wide as the input) stay in the CPU's cache: about twice as
        fast as whole-tensor operations there. -> sigma (M, 1), rgb (M, decoder_output_dim)."""
        sigma = x.new_empty(len(x), 1)
        rgb = x.new_empty(len(x), self.decoder_output_dim)
        for i in range(0, len(x), chunk):
            out = self.net(x[i:i + chunk])
            sigma[i:i + chunk] = out[:, :1]
            widened_sigmoid(out[:, 1:], out=rgb[i:i + chunk])
        return sigma, rgb
