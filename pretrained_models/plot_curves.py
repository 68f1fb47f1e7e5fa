"""Plot a training run's metric curves and its speed against kimg, as one PNG (Pillow only).

    python pretrained_models/plot_curves.py training-runs/00003-bundled2 [the folders of its resumed parts ...] \\
        --out pretrained_models/curves.png

Reads every `metric-<name>.jsonl` of the folders (one JSON line per evaluated snapshot, as
`train.py --metrics` and `calc_metrics.py` append them) and their `stats.jsonl` (one line per
tick). One panel per result key (e.g. `mesh_surface_tiny_opacity`) against the snapshot's
kimg, read from its name (`network-snapshot-KKKKKK.KKK.pkl`, or `...KKK-N.pkl` where the
trainer found the name taken); a snapshot evaluated more than once shows its last value
(later folders after earlier ones); NaN values are left out. The last panel is the speed:
`Timing/sec_per_kimg` of every tick, titled with the training time of all folders (the sum
of each folder's last `Timing/total_sec`). A folder without `stats.jsonl` adds no timing (a
note says so). Without `--out` the plot is `curves.png` in the first folder; an existing
file there is replaced (atomically).
"""

import glob
import json
import math
import os
import re
import sys

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run as a script from anywhere

from dnnlib import cli                          # noqa: E402
from torch_utils import persistence             # noqa: E402

SNAPSHOT = re.compile(r'^network-snapshot-(\d+\.\d{3})(?:-\d+)?\.pkl$')   # -N: saved under its first free name
PANEL_W, PANEL_H, COLUMNS = 400, 250, 3
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 30, 40
CURVE, TIMING, GRID, INK = (31, 95, 191), (200, 90, 20), (225, 225, 225), (40, 40, 40)


def read_jsonl(path: str) -> list:
    """(line number, dict) of every non-empty line; ValueError naming the file and line otherwise."""
    records = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.strip())
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}: line {number}: not JSON ({e.msg})') from e
            if not isinstance(record, dict):
                raise ValueError(f'{path}: line {number}: expected a JSON object, found {type(record).__name__}')
            records.append((number, record))
    return records


def read_metrics(folder: str, curves: dict):
    """Add the folder's metric results to curves {result key: {kimg: value}}."""
    for path in sorted(glob.glob(os.path.join(folder, 'metric-*.jsonl'))):
        for number, record in read_jsonl(path):
            results, snapshot = record.get('results'), record.get('snapshot_pkl')
            match = SNAPSHOT.match(snapshot) if isinstance(snapshot, str) else None
            if match is None:
                raise ValueError(f'{path}: line {number}: snapshot_pkl {snapshot!r} is not a network-snapshot-KKKKKK.KKK.pkl name')
            if not isinstance(results, dict) or not all(isinstance(v, (int, float)) for v in results.values()):
                raise ValueError(f'{path}: line {number}: expected "results": {{name: number, ...}}')
            for key, value in results.items():
                curves.setdefault(key, {})[float(match.group(1))] = float(value)


def read_timing(folder: str):
    """The folder's [(kimg, sec/kimg) per tick with finite values] and its last total seconds; None without stats.jsonl."""
    path = os.path.join(folder, 'stats.jsonl')
    if not os.path.isfile(path):
        return None
    ticks, total = [], 0.0
    for number, record in read_jsonl(path):
        expected = f'{path}: line {number}: expected Progress/kimg, Timing/sec_per_kimg and Timing/total_sec as {{"mean": number}}'
        try:
            kimg, speed, total = (record[key]['mean'] for key in ('Progress/kimg', 'Timing/sec_per_kimg', 'Timing/total_sec'))
        except (KeyError, TypeError) as e:
            raise ValueError(f'{expected} ({e!r} is missing)') from e
        for value in (kimg, speed, total):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f'{expected} ({value!r} is not a number)')
        if math.isfinite(kimg) and math.isfinite(speed):        # as NaN metric values, left out of the plot
            ticks.append((float(kimg), float(speed)))
    return ticks, float(total)


def read_runs(folders) -> tuple:
    """The folders' curves {result key: {kimg: value}}, ticks [(kimg, sec/kimg)] and total training seconds."""
    curves, timing, total_sec = {}, [], 0.0
    for folder in folders:
        read_metrics(folder, curves)
        folder_timing = read_timing(folder)
        if folder_timing is None:
            print(f'note: {folder}: no stats.jsonl, no timing from this folder')
        else:
            timing += folder_timing[0]
            total_sec += folder_timing[1]
    return curves, timing, total_sec


def nice_ticks(lo: float, hi: float, count: int = 5) -> list:
    """Round tick values (steps of 1, 2 or 5 x a power of ten) covering [lo, hi] with about `count` ticks."""
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def padded_range(lo: float, hi: float) -> tuple:
    """[lo, hi] widened by 5% on each side (a single value: by 10% of it, or by 1 around 0)."""
    pad = (hi - lo) * 0.05 if hi > lo else (abs(lo) * 0.1 or 1.0)
    return lo - pad, hi + pad


def draw_panel(draw: PIL.ImageDraw.ImageDraw, left: int, top: int, title: str, points: list, kimg_range: tuple, colour, font):
    """One curve of points [(kimg, value)] (sorted by kimg) in the panel whose corner is (left, top)."""
    x0, y0, x1, y1 = left + MARGIN_L, top + MARGIN_T, left + PANEL_W - MARGIN_R, top + PANEL_H - MARGIN_B
    draw.text((left + 8, top + 6), title, fill=INK, font=font)
    pts = np.array(points, dtype=np.float64)
    (xlo, xhi), (ylo, yhi) = kimg_range, padded_range(pts[:, 1].min(), pts[:, 1].max())

    def to_pixel(kimg, value):
        return x0 + (kimg - xlo) / (xhi - xlo) * (x1 - x0), y1 - (value - ylo) / (yhi - ylo) * (y1 - y0)

    for value in nice_ticks(ylo, yhi):
        y = to_pixel(xlo, value)[1]
        draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.text((x0 - 6, y), f'{value:.4g}', fill=INK, font=font, anchor='rm')
    for kimg in nice_ticks(xlo, xhi):
        x = to_pixel(kimg, ylo)[0]
        draw.line([(x, y0), (x, y1)], fill=GRID)
        draw.text((x, y1 + 4), f'{kimg:g}', fill=INK, font=font, anchor='ma')
    draw.text(((x0 + x1) / 2, y1 + 20), 'kimg', fill=INK, font=font, anchor='ma')
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    pixels = [to_pixel(k, v) for k, v in pts]
    if len(pixels) > 1:
        draw.line(pixels, fill=colour, width=2)
    for x, y in pixels:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def plot(curves: dict, timing: list, total_sec: float) -> PIL.Image.Image:
    """curves {key: {kimg: value}}, timing [(kimg, sec/kimg)] -> the figure."""
    panels = []
    for key in sorted(curves):
        points = sorted((k, v) for k, v in curves[key].items() if math.isfinite(v))
        if points:
            panels.append((f'{key}   last {points[-1][1]:.4g} at {points[-1][0]:g} kimg', points, CURVE))
    if timing:
        panels.append((f's/kimg per tick   {total_sec / 3600:.2f} h of training', sorted(timing), TIMING))
    if not panels:
        raise ValueError('nothing to plot: every metric value is NaN')
    kimg_range = padded_range(0.0, max(k for _, points, _ in panels for k, _ in points))     # shared: the curves line up
    rows = (len(panels) + COLUMNS - 1) // COLUMNS
    image = PIL.Image.new('RGB', (PANEL_W * min(COLUMNS, len(panels)), PANEL_H * rows), 'white')
    draw = PIL.ImageDraw.Draw(image)
    font = PIL.ImageFont.load_default(size=13)
    for i, (title, points, colour) in enumerate(panels):
        draw_panel(draw, (i % COLUMNS) * PANEL_W, (i // COLUMNS) * PANEL_H, title, points, kimg_range, colour, font)
    return image


@click.command()
@click.argument('runs', nargs=-1, required=True, metavar='RUN_FOLDER...')
@click.option('--out', help='PNG to write [default: RUN_FOLDER/curves.png of the first folder]', metavar='PNG')
@cli.user_errors
def main(runs, out):
    """Plot the metric curves and speed of training run folders against kimg."""
    for folder in runs:
        if not os.path.isdir(folder):
            raise click.ClickException(f'{folder}: no such run folder')
    out = out or os.path.join(runs[0], 'curves.png')
    if not out.lower().endswith('.png'):
        raise click.ClickException(f'{out}: --out must name a .png file')
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise click.ClickException(f'{out}: its folder does not exist')
    curves, timing, total_sec = read_runs(runs)
    if not curves:
        raise click.ClickException(f'{", ".join(runs)}: no metric-*.jsonl results (evaluate snapshots with '
                                   'train.py --metrics=... or calc_metrics.py)')
    image = plot(curves, timing, total_sec)
    existed = os.path.exists(out)
    with persistence.atomic_output(out) as tmp:
        image.save(tmp, format='PNG')
    print(f'{"replaced" if existed else "wrote"} {out}: {len(curves)} curves' + (f', {len(timing)} ticks' if timing else ''))


if __name__ == '__main__':
    main()
