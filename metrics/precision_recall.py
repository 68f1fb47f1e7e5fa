"""Improved precision and recall (Kynkäänniemi et al. 2019): k-nearest-neighbour manifolds.

A feature set's manifold is the union of balls around its points, each ball reaching the
point's k-th nearest other point of the set. Precision is the fraction of generated features
inside the real manifold (are the images realistic?), recall the fraction of real features
inside the generated manifold (is the data covered?).

Features: StyleGAN's `pr50k3_full` uses VGG16 features; no VGG16 detector is available
offline here, so ours uses the 2048-D Inception pool features of the FID detector. The
numbers are not comparable with published precision/recall.
"""

import numpy as np
import torch

from metrics import metric_utils


def knn_radii(features: torch.Tensor, k: int, batch_size: int = 10000) -> torch.Tensor:
    """(N, D) -> (N,) distance of each point to its k-th nearest other point of the set."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f'k={k} nearest neighbours need more than {k} points, got {n}')
    batch_size = max(batch_size, k + 1)
    radii = []
    for rows in features.split(batch_size):
        nearest = None          # the k + 1 smallest distances so far, the point itself (0) included
        for cols in features.split(batch_size):
            dist = torch.cdist(rows, cols)
            if nearest is not None:
                dist = torch.cat([nearest, dist], dim=1)
            nearest = dist.topk(min(k + 1, dist.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def inside_manifold(probes: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, batch_size: int = 10000) -> torch.Tensor:
    """(P, D) probes, (N, D) points with (N,) radii -> (P,) bool: within some point's radius."""
    inside = []
    for rows in probes.split(batch_size):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for cols, r in zip(points.split(batch_size), radii.split(batch_size)):
            hit |= (torch.cdist(rows, cols) <= r[None]).any(dim=1)
        inside.append(hit)
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, gen: torch.Tensor, k: int = 3, batch_size: int = 10000):
    """(precision, recall) of generated (M, D) against real (N, D) features."""
    precision = inside_manifold(gen, real, knn_radii(real, k, batch_size), batch_size)
    recall = inside_manifold(real, gen, knn_radii(gen, k, batch_size), batch_size)
    return float(precision.float().mean()), float(recall.float().mean())


def compute_pr(opts: metric_utils.MetricOptions, max_real: int, num_gen: int, k: int = 3, batch_size: int = 10000):
    """(precision, recall) of opts.G against up to `max_real` dataset images with `num_gen` generated ones."""
    real = metric_utils.compute_feature_stats_for_dataset(opts, max_items=max_real, capture_all=True).get_all()
    gen = metric_utils.compute_feature_stats_for_generator(opts, max_items=num_gen, capture_all=True).get_all()
    if opts.rank != 0:
        return float('nan'), float('nan')
    as_tensor = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32)).to(opts.device)
    return precision_recall(as_tensor(real), as_tensor(gen), k=k, batch_size=batch_size)
