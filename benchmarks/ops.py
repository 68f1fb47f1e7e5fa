"""Speed of the custom ops: CUDA kernel vs eager reference vs torch.compile(reference).

Shapes are those of the FFHQ-512 generator: bias_act on (4, 512, 64, 64) and
(4, 128, 512, 512); a 2x FIR upsample of (4, 256, 128, 128) with the 4-tap [1, 3, 3, 1]
filter; filtered_lrelu with up 2 / down 2 and 4-tap filters on (4, 256, 64, 64). Each in
float32 and bfloat16, forward and forward + backward.

GB/s is the ideal memory traffic of the operation divided by the time: every input and
output tensor read or written once (bias_act forward: x read, y written; backward adds dy
and x read, dx written; the resampling ops likewise with their input and output sizes).
A composed implementation that makes extra passes therefore shows a lower figure.

Prints a markdown table and writes it to benchmarks/results/ops-<device>-<date>.md with
the device, PyTorch version and git commit. Without a GPU only the reference columns
run. `--quick` uses few repeats (GPU: 1 warm-up, 3 timed; CPU: one run, no torch.compile
column) and finishes in under a minute on an idle 2-core CPU.

    python benchmarks/ops.py                    # GPU if present, else CPU
    python benchmarks/ops.py --quick --device cpu
"""

import datetime
import os
import re
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, device_name, git_commit, load_average, timed, write_result   # noqa: E402
from torch_utils.ops import _build                       # noqa: E402
from torch_utils.ops import bias_act as bias_act_mod     # noqa: E402
from torch_utils.ops import filtered_lrelu as filtered_lrelu_mod  # noqa: E402
from torch_utils.ops import upfirdn2d as upfirdn2d_mod   # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cases(device: torch.device) -> list:
    """(name, input shape, fn(x, impl), output shape) for each benchmarked op."""
    f = upfirdn2d_mod.setup_filter([1, 3, 3, 1], device=device)

    def bias_act(channels):
        b = torch.randn(channels, device=device)
        return lambda x, impl: bias_act_mod.bias_act(x, b.to(x.dtype), act='lrelu', impl=impl)

    def upsample(x, impl):
        return upfirdn2d_mod.upsample2d(x, f, impl=impl)

    b256 = torch.randn(256, device=device)

    def filtered_lrelu(x, impl):
        # padding 5 in total keeps the size: (2H + 5 - 3 - 4) // 2 + 1 = H.
        return filtered_lrelu_mod.filtered_lrelu(x, f, f, b256.to(x.dtype), up=2, down=2, padding=[3, 2, 3, 2], impl=impl)

    return [
        ('bias_act lrelu', (4, 512, 64, 64), bias_act(512), (4, 512, 64, 64)),
        ('bias_act lrelu', (4, 128, 512, 512), bias_act(128), (4, 128, 512, 512)),
        ('upsample2d 2x, 4 taps', (4, 256, 128, 128), upsample, (4, 256, 256, 256)),
        ('filtered_lrelu up2/down2', (4, 256, 64, 64), filtered_lrelu, (4, 256, 64, 64)),
    ]


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@click.command()
@click.option('--device', 'device_str', default=None, help='torch device (default: cuda if available, else cpu)')
@click.option('--quick', is_flag=True, help='few repeats (CPU: one run, no torch.compile column)')
@click.option('--repeats', default=20, show_default=True, type=click.IntRange(min=1), help='timed repetitions (median reported)')
@click.option('--warmup', default=3, show_default=True, type=click.IntRange(min=0), help='untimed repetitions first')
@click.option('--compile/--no-compile', 'use_compile', default=True, show_default=True, help='include the torch.compile(reference) column')
@click.option('--outdir', default=RESULTS_DIR, show_default='benchmarks/results', type=click.Path(file_okay=False), help='where the markdown file goes')
def main(device_str, quick, repeats, warmup, use_compile, outdir):
    """Time the ops and write a markdown table."""
    device = torch.device(device_str or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if quick:
        # Eager CPU code needs no warm-up; GPU code does (allocator, cuDNN/compile caches).
        repeats, warmup = (3, 1) if device.type == 'cuda' else (1, 0)
        use_compile = use_compile and device.type == 'cuda'
    torch.manual_seed(0)
    impls = [('ref', 'eager reference')]
    if use_compile:
        impls.append(('compiled', 'torch.compile(reference)'))
    if device.type == 'cuda':
        cuda_ok = _build.kernel_available('bias_act', bias_act_mod.SOURCES) and _build.kernel_available('upfirdn2d', upfirdn2d_mod.SOURCES)
        if cuda_ok:
            impls.insert(0, ('cuda', 'CUDA kernel'))
        else:
            print('CUDA extensions did not build (see the warning above); timing the references only.')

    load_before = load_average()
    rows = []
    started = time.perf_counter()
    for name, in_shape, fn, out_shape in make_cases(device):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(in_shape, device=device, dtype=dtype)
            dy = torch.randn(out_shape, device=device, dtype=dtype)
            size = torch.finfo(dtype).bits // 8
            for mode in ('forward', 'forward+backward'):
                traffic = (numel(in_shape) + numel(out_shape)) * size * (1 if mode == 'forward' else 2)
                if mode == 'forward+backward' and name.startswith('bias_act'):
                    traffic += numel(in_shape) * size      # the backward also reads x
                cells = []
                for impl, _ in impls:
                    call = (lambda x, fn=fn: fn(x, 'ref')) if impl != 'cuda' else (lambda x, fn=fn: fn(x, 'cuda'))
                    if impl == 'compiled':
                        torch.compiler.reset()      # a fresh compile per measurement, no recompile limits
                        call = torch.compile(call, fullgraph=True)
                    if mode == 'forward':
                        run = lambda call=call: call(x)
                        with torch.no_grad():
                            seconds = timed(run, device, repeats, warmup)
                    else:
                        xg = x.detach().requires_grad_(True)
                        run = lambda call=call, xg=xg: torch.autograd.grad(call(xg), [xg], dy)
                        seconds = timed(run, device, repeats, warmup)
                    cells.append(f'{seconds * 1e3:.4g} ms / {traffic / seconds / 1e9:.3g} GB/s')
                rows.append([name, 'x'.join(str(s) for s in in_shape), str(dtype).replace('torch.', ''), mode] + cells)
                print(' | '.join(rows[-1]), flush=True)
    elapsed = time.perf_counter() - started

    header = ['op', 'input', 'dtype', 'pass'] + [label for _, label in impls]
    table = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows]
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f'# Custom ops benchmark, {device_name(device)}',
        '',
        f'- date: {now.strftime("%Y-%m-%d %H:%M UTC")}',
        f'- device: {device_name(device)}',
        f'- torch: {torch.__version__} (CUDA {torch.version.cuda})',
        f'- git commit: {git_commit("torch_utils/ops", "benchmarks/ops.py")}',
        f'- settings: repeats={repeats} (median), warmup={warmup}, quick={quick}; total {elapsed:.0f} s',
        f'- system load average (1 min) before / after: {load_before:.1f} / {load_average():.1f} '
        f'on {os.cpu_count()} CPUs (other processes compete for the CPU when it exceeds the count)',
        '- cells: median time / ideal traffic (every input and output read or written once) per second',
        '',
    ] + table + ['']
    text = '\n'.join(lines)
    print('\n' + text)
    slug = re.sub(r'[^a-z0-9]+', '-', (torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu').lower()).strip('-')
    write_result(outdir, f'ops-{slug}-{now.strftime("%Y-%m-%d")}.md', text)


if __name__ == '__main__':
    main()
