"""Fréchet Inception Distance (Heusel et al. 2017) between real and generated images.

FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) over Inception pool features,
with biased covariances, as in the reference implementation.

Tr((S_r S_g)^(1/2)) is computed as Tr((A S_g A)^(1/2)) with A = S_r^(1/2): the same value
(the two matrices are similar), from two symmetric eigendecompositions. The reference's
scipy.linalg.sqrtm of the non-symmetric product gives it too, but takes about ten times
as long at 2048-D and loses accuracy when the covariances are singular (fewer images
than feature dimensions, as in the *_tiny metrics).
"""

import numpy as np

from metrics import metric_utils


def psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise set to 0 (numpy's matrix_rank tolerance).

    Singular covariances (fewer images than dimensions) have many eigenvalues that are 0 up to
    rounding; their square roots (~1e-8 each) would otherwise add up over 2048 dimensions.
    """
    return np.where(w > np.abs(w).max() * len(w) * np.finfo(w.dtype).eps, w, 0)


def fid_from_stats(mu_real: np.ndarray, sigma_real: np.ndarray, mu_gen: np.ndarray, sigma_gen: np.ndarray) -> float:
    """FID from two means (D,) and covariances (D, D) (float64)."""
    m = np.square(mu_gen - mu_real).sum()
    w, v = np.linalg.eigh(sigma_real)
    a = (v * np.sqrt(psd_eigenvalues(w))) @ v.T                            # S_r^(1/2)
    trace_sqrt = np.sqrt(psd_eigenvalues(np.linalg.eigvalsh(a @ sigma_gen @ a))).sum()
    return float(m + np.trace(sigma_real) + np.trace(sigma_gen) - 2 * trace_sqrt)


def compute_fid(opts: metric_utils.MetricOptions, max_real: int, num_gen: int) -> float:
    """FID of opts.G against up to `max_real` dataset images (None = all) with `num_gen` generated ones."""
    mu_real, sigma_real = metric_utils.compute_feature_stats_for_dataset(
        opts, max_items=max_real, capture_mean_cov=True).get_mean_cov()
    mu_gen, sigma_gen = metric_utils.compute_feature_stats_for_generator(
        opts, max_items=num_gen, capture_mean_cov=True).get_mean_cov()
    if opts.rank != 0:
        return float('nan')
    return fid_from_stats(mu_real, sigma_real, mu_gen, sigma_gen)
