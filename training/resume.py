"""`--resume`: continue a run from its snapshot, or start a new model from other weights.

Continue: the snapshot holds a `resume_state` and networks whose every parameter and
buffer matches the ones this run builds (names and shapes) -> the weights are copied and
the loop restores counters and optimizers from the state.

Initialise (SPEC section 6): anything else, typically an EG3D checkpoint for a Next3D
model. Parameters and buffers with the same name and shape are copied (static backbone,
super-resolution, decoder, D). Then every StyleGAN2 synthesis tensor still missing in a
generator part - the texture generator, the StyleUNets' decoders - is taken from the
source's backbone synthesis block of the same resolution and layer, where the shapes
agree (`b{res}.{conv0,conv1,torgb}...`). Everything else keeps its fresh initialization.
The report lists what was copied and what was not.
"""

import re

from torch_utils import misc

_BLOCK = re.compile(r'(^|.*\.)(b\d+\..*)$')     # '...<prefix>.b64.conv0.weight' -> 'b64.conv0.weight'


def stylegan_rename(source_prefix: str = 'backbone.synthesis.'):
    """dst name -> source name: a synthesis block tensor of any part -> the source backbone's block."""
    def rename(name: str):
        if name.startswith(source_prefix):
            return name
        m = _BLOCK.match(name)
        return source_prefix + m.group(2) if m else name
    return rename


def _architecture_matches(src, dst) -> bool:
    if src is None or type(src).__name__ != type(dst).__name__:
        return False
    a, b = dict(misc.named_params_and_buffers(src)), dict(misc.named_params_and_buffers(dst))
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def initialise(src, dst, name: str, log=print) -> dict:
    """Copy matching tensors of `src` into `dst`, then backbone blocks into other generator parts; print a report."""
    report = misc.copy_params_and_buffers(src, dst)
    if name in ('G', 'G_ema'):
        remaining = set(report['missing'] + report['shape_mismatch'])
        rename = stylegan_rename()
        extra = misc.copy_params_and_buffers(src, _Subset(dst, remaining), rename=rename)
        report['copied'] += [f'{n} <- {rename(n)}' for n in extra['copied']]
        remaining -= set(extra['copied'])
        mismatched = set(report['shape_mismatch']) | set(extra['shape_mismatch'])
        report['shape_mismatch'] = sorted(remaining & mismatched)
        report['missing'] = sorted(remaining - mismatched)
    total = len(list(misc.named_params_and_buffers(dst)))
    log(f'  {name}: copied {len(report["copied"])} of {total} tensors; '
        f'{len(report["shape_mismatch"])} shape mismatches, {len(report["missing"])} not in the source (fresh)')
    for key in ('shape_mismatch', 'missing'):
        for n in _summarise(report[key]):
            log(f'    {key}: {n}')
    return report


def _summarise(names, depth: int = 2):
    """Collapse names to their first `depth` components with counts, for a readable report."""
    groups = {}
    for n in names:
        key = '.'.join(n.split('.')[:depth])
        groups[key] = groups.get(key, 0) + 1
    return [f'{k}.* ({v})' if v > 1 else k for k, v in sorted(groups.items())]


class _Subset:
    """A view of a module's named parameters and buffers restricted to `names` (for copy_params_and_buffers)."""

    def __init__(self, module, names):
        self.module, self.names = module, set(names)

    def named_parameters(self):
        return [(n, t) for n, t in self.module.named_parameters() if n in self.names]

    def named_buffers(self):
        return [(n, t) for n, t in self.module.named_buffers() if n in self.names]


def restore(resume_data, G, D, G_ema, log=print):
    """Load `resume_data` (legacy.load_network_pkl's dict) into G, D, G_ema.

    Returns ('continue', resume_state) when the snapshot continues this run, else
    ('initialise', None) after copying what fits.
    """
    resume_state = resume_data.get('resume_state')
    same = all(_architecture_matches(resume_data.get(k), m) for k, m in (('G', G), ('D', D), ('G_ema', G_ema)))
    if resume_state is not None and same:
        for key, module in (('G', G), ('D', D), ('G_ema', G_ema)):
            misc.copy_params_and_buffers(resume_data[key], module, require_all=True)
        return 'continue', resume_state
    if resume_state is not None:
        log('The snapshot\'s networks differ from this run\'s: initialising from its weights instead of continuing.')
    log('Initialising from the checkpoint\'s weights:')
    for key, module in (('G', G), ('D', D), ('G_ema', G_ema)):
        src = resume_data.get(key)
        if src is None:
            log(f'  {key}: not in the checkpoint (fresh)')
            continue
        initialise(src, module, key, log)
    return 'initialise', None
