"""Identity consistency: one latent code seen from other views and driven by other meshes.

EG3D and Next3D report the mean cosine similarity of face-recognition embeddings (ArcFace)
between renders of one identity from different cameras; Next3D also animates it. Here the
embedding is dlib's 128-d face descriptor (`face_analysis`; offline). Per seed: z ~ N(0, I)
and two driving meshes A and B of random dataset items; G's mapping sees a frontal camera
(with the intrinsics and any extra label values of item A, as gen_samples conditions), and
G renders four images: A and B, each from yaw -YAW and +YAW (level, radius 2.7, around the
pivot). Results, means over the pairs whose two images have a face:

    name         all six pairs of the four images
    name_views   same mesh, other view: (A-, A+), (B-, B+)
    name_meshes  same view, other mesh: (A-, B-), (A+, B+) - on a dataset of many people the
                 meshes differ in face shape as well as expression (as when Next3D is driven by
                 another person's video); on one person's video, in expression only
    name_faces   fraction of the images with a face

Scale: dlib's descriptors share a common direction, so unrelated faces score high too. On the
synthetic heads at 64 px (docs/EVALUATION.md) the same head from yaw -17 and +17 degrees scores
~0.985, two different heads ~0.945; an image against itself scores 1.

Samples: z and the meshes drawn with seed 3 (`metric_utils.iterate_generator_inputs`), G's
random depth samples from a generator seeded with RENDER_SEED: the value repeats exactly for
the same count and batch size.
"""

import copy
import itertools
import math

import numpy as np
import torch

from metrics import face_analysis
from metrics import metric_utils
from training import coords

YAW = 0.3                       # radians either side of frontal (about 17 degrees): dlib's frontal detector finds ~95% of faces
VIEWS = (('A', -1), ('A', 1), ('B', -1), ('B', 1))      # mesh, yaw sign of the four renders per seed
RENDER_SEED = 0                 # of the renderer's random depth samples (`metric_utils.render_generator`)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D), (N, D) -> (N,) cosine similarity of matching rows."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def pair_similarities(descriptors: np.ndarray) -> dict:
    """(4, N, 128) descriptors of the VIEWS of N seeds (NaN rows: no face) ->
    {'all' | 'views' | 'meshes': (sum of cosine similarities, number of pairs)}."""
    out = {k: [0.0, 0] for k in ('all', 'views', 'meshes')}
    for i, j in itertools.combinations(range(len(VIEWS)), 2):
        ok = np.isfinite(descriptors[i]).all(-1) & np.isfinite(descriptors[j]).all(-1)
        total = float(cosine_similarity(descriptors[i][ok], descriptors[j][ok]).sum())
        kinds = ['all']
        if VIEWS[i][0] == VIEWS[j][0]:
            kinds.append('views')
        if VIEWS[i][1] == VIEWS[j][1]:
            kinds.append('meshes')
        for k in kinds:
            out[k][0] += total
            out[k][1] += int(ok.sum())
    return out


def view_labels(c: torch.Tensor, yaw_sign: int) -> torch.Tensor:
    """Cameras (N, 25) at yaw pi/2 + sign * YAW, level, with the intrinsics of labels c (N, 25+)."""
    cam2world = coords.cam2world_look_at(torch.full([len(c)], math.pi / 2 + yaw_sign * YAW), torch.full([len(c)], math.pi / 2))
    return coords.make_label(cam2world.to(c.device), coords.split_label(c[:, :25])[1])


def compute_identity_consistency(opts: metric_utils.MetricOptions, name: str, num_seeds: int) -> dict:
    """{name, name_views, name_meshes, name_faces} over `num_seeds` seeds (4 images each) shared by the ranks."""
    G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
    if getattr(G, 'num_vertices', None) is None:
        raise ValueError(f'{name} needs a mesh-driven (Next3D) generator')
    face_analysis.check_requirements(name, int(G.img_resolution))
    analyzer = face_analysis.FaceAnalyzer(descriptors=True)
    c_dim = max(int(G.c_dim), 25)
    sums = torch.zeros(8, dtype=torch.float64)        # (sum, pairs) for all, views, meshes; faces, images
    generator = metric_utils.render_generator(opts, RENDER_SEED)
    inputs = metric_utils.iterate_generator_inputs(opts, opts.batch_size, seed=3)
    done = 0
    num_seeds = (num_seeds + opts.num_gpus - 1) // opts.num_gpus      # this rank's share
    while done < num_seeds:
        n = min(opts.batch_size, num_seeds - done)
        z, c_a, v_a = (x[:n] for x in next(inputs))
        _, _, v_b = (x[:n] for x in next(inputs))
        c_cond = torch.cat([view_labels(c_a, 0), c_a[:, 25:]], dim=1)[:, :c_dim]
        meshes = dict(A=v_a, B=v_b)
        descriptors = []
        with torch.no_grad():
            ws = G.mapping(z, c_cond)
            for mesh, sign in VIEWS:
                out = G.synthesis(ws, view_labels(c_a, sign), meshes[mesh], noise_mode='const', generator=generator)
                images = (out['image'] * 127.5 + 128).clamp(0, 255).to(torch.uint8)
                descriptors.append(analyzer.descriptors(images, analyzer.landmarks(images)))
        descriptors = np.stack(descriptors)
        for k, (total, count) in enumerate(pair_similarities(descriptors).values()):
            sums[2 * k] += total
            sums[2 * k + 1] += count
        sums[6] += float(np.isfinite(descriptors).all(-1).sum())
        sums[7] += descriptors.shape[0] * descriptors.shape[1]
        done += n
        if opts.progress and opts.rank == 0:
            print(f'  {name}: {done}/{num_seeds} seeds')
    inputs.close()
    if opts.num_gpus > 1:
        sums = sums.to(opts.device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    keys = (name, f'{name}_views', f'{name}_meshes')
    results = {key: float(sums[2 * k] / sums[2 * k + 1]) if sums[2 * k + 1] > 0 else float('nan') for k, key in enumerate(keys)}
    results[f'{name}_faces'] = float(sums[6] / sums[7])
    return results
