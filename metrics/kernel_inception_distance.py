"""Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel.

k(x, y) = (x . y / D + 1)^3. For each of `num_subsets` random subsets of m real and m
generated features (m = min(n_real, n_gen, max_subset_size)), the unbiased estimate is

    MMD^2 = mean_{i != j} k(g_i, g_j) + mean_{i != j} k(r_i, r_j) - 2 mean_{i, j} k(g_i, r_j)

and KID is its mean over the subsets. Its expectation is 0 when both sets come from the
same distribution.
"""

import numpy as np

from metrics import metric_utils


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, D), (M, D) -> (N, M) kernel matrix (x . y / D + 1)^3."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(gen: np.ndarray, real: np.ndarray) -> float:
    """Unbiased MMD^2 of two equally sized feature sets (m, D) under the polynomial kernel."""
    m = gen.shape[0]
    k_gg, k_rr, k_gr = polynomial_kernel(gen, gen), polynomial_kernel(real, real), polynomial_kernel(gen, real)
    within = (k_gg.sum() - np.trace(k_gg) + k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    return float(within - 2 * k_gr.mean())


def kid_from_features(real: np.ndarray, gen: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID from real (N, D) and generated (M, D) features, averaged over random subsets."""
    m = min(real.shape[0], gen.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f'KID needs at least 2 real and 2 generated features, got {real.shape[0]} and {gen.shape[0]}')
    rnd = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        g = gen[rnd.choice(gen.shape[0], m, replace=False)]
        r = real[rnd.choice(real.shape[0], m, replace=False)]
        total += mmd2_unbiased(g, r)
    return total / num_subsets


def compute_kid(opts: metric_utils.MetricOptions, max_real: int, num_gen: int, num_subsets: int = 100, max_subset_size: int = 1000) -> float:
    """KID of opts.G against up to `max_real` dataset images (None = all) with `num_gen` generated ones."""
    real = metric_utils.compute_feature_stats_for_dataset(opts, max_items=max_real, capture_all=True).get_all()
    gen = metric_utils.compute_feature_stats_for_generator(opts, max_items=num_gen, capture_all=True).get_all()
    if opts.rank != 0:
        return float('nan')
    return kid_from_features(real, gen, num_subsets=num_subsets, max_subset_size=max_subset_size)
