"""Fréchet Inception Distance (Heusel et al. 2017) between real and generated images.

FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) over Inception pool features,
with biased covariances, as in the reference implementation.
"""

import numpy as np
import scipy.linalg

from metrics import metric_utils


def fid_from_stats(mu_real: np.ndarray, sigma_real: np.ndarray, mu_gen: np.ndarray, sigma_gen: np.ndarray) -> float:
    """FID from two means (D,) and covariances (D, D) (float64)."""
    m = np.square(mu_gen - mu_real).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma_gen, sigma_real))
    return float(np.real(m + np.trace(sigma_gen + sigma_real - s * 2)))


def compute_fid(opts: metric_utils.MetricOptions, max_real: int, num_gen: int) -> float:
    """FID of opts.G against up to `max_real` dataset images (None = all) with `num_gen` generated ones."""
    mu_real, sigma_real = metric_utils.compute_feature_stats_for_dataset(
        opts, max_items=max_real, capture_mean_cov=True).get_mean_cov()
    mu_gen, sigma_gen = metric_utils.compute_feature_stats_for_generator(
        opts, max_items=num_gen, capture_mean_cov=True).get_mean_cov()
    if opts.rank != 0:
        return float('nan')
    return fid_from_stats(mu_real, sigma_real, mu_gen, sigma_gen)
