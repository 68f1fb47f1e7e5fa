"""pretrained_models/plot_curves.py: a synthetic run folder -> the PNG read back; its one-line errors."""

import json
import math
import os

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from pretrained_models import plot_curves as pc


def write_lines(path, records):
    path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))


def metric_record(kimg: float, **results):
    return dict(results=results, metric='m', total_time=1.0, snapshot_pkl=f'network-snapshot-{kimg:010.3f}.pkl')


def stats_record(kimg: float, speed: float, total: float):
    return {'Progress/kimg': {'num': 1, 'mean': kimg}, 'Timing/sec_per_kimg': {'num': 1, 'mean': speed},
            'Timing/total_sec': {'num': 1, 'mean': total}}


@pytest.fixture
def run(tmp_path):
    """Snapshots at 0, 2 and 4 kimg; 2 was evaluated twice (the second value counts), and b is NaN at 4."""
    folder = tmp_path / 'run'
    folder.mkdir()
    write_lines(folder / 'metric-a.jsonl', [metric_record(0, a=0.5), metric_record(2, a=9.0), metric_record(4, a=0.25),
                                            metric_record(2, a=0.3)])
    write_lines(folder / 'metric-b.jsonl', [metric_record(0, b_x=1.0, b_y=-1.0), metric_record(4, b_x=float('nan'), b_y=2.0)])
    write_lines(folder / 'stats.jsonl', [stats_record(1, 200.0, 250.0), stats_record(3, 100.0, 3600.0)])
    return folder


def invoke(args):
    return CliRunner().invoke(pc.main, args)


def error_line(result) -> str:
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output + repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1, result.output
    return lines[0]


def test_curves_of_a_run(run):
    curves = {}
    pc.read_metrics(str(run), curves)
    assert curves['a'] == {0.0: 0.5, 2.0: 0.3, 4.0: 0.25}
    assert curves['b_y'] == {0.0: -1.0, 4.0: 2.0} and math.isnan(curves['b_x'][4.0])
    assert pc.read_timing(str(run)) == ([(1.0, 200.0), (3.0, 100.0)], 3600.0)


def test_the_png_is_written_and_reads_back(run):
    result = invoke([str(run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert result.output == f'wrote {run / "curves.png"}: 3 curves, 2 ticks\n'
    with PIL.Image.open(run / 'curves.png') as image:
        assert image.format == 'PNG'
        pixels = np.asarray(image.convert('RGB'))
    # Panels a, b_x, b_y, then the timing: two rows of three.
    assert pixels.shape == (2 * pc.PANEL_H, 3 * pc.PANEL_W, 3)
    # The last point of `a` (4 kimg, 0.25) is a dot in the curve's colour: kimg axis 0-4 widened by 5%,
    # values 0.25-0.5 widened by 5%.
    x0, y0 = pc.MARGIN_L, pc.MARGIN_T
    x1, y1 = pc.PANEL_W - pc.MARGIN_R, pc.PANEL_H - pc.MARGIN_B
    x = x0 + (4 + 0.2) / 4.4 * (x1 - x0)
    y = y1 - (0.25 - (0.25 - 0.0125)) / 0.275 * (y1 - y0)
    assert tuple(pixels[round(y), round(x)]) == pc.CURVE
    # The timing panel (row 2, column 1) holds its curve; the empty sixth panel is white.
    timing = pixels[pc.PANEL_H:, :pc.PANEL_W].reshape(-1, 3)
    assert (timing == pc.TIMING).all(axis=1).sum() > 50
    assert (pixels[pc.PANEL_H:, 2 * pc.PANEL_W:] == 255).all()


def test_an_existing_plot_is_replaced_whole(run, tmp_path):
    out = tmp_path / 'plot.png'
    out.write_bytes(b'old')
    result = invoke([str(run), '--out', str(out)])
    assert result.exit_code == 0 and result.output.startswith(f'replaced {out}')
    with PIL.Image.open(out) as image:
        assert image.size == (3 * pc.PANEL_W, 2 * pc.PANEL_H)
    assert sorted(os.listdir(tmp_path)) == ['plot.png', 'run']      # no temporary file left


def test_a_folder_without_stats_has_no_timing_panel(run):
    os.remove(run / 'stats.jsonl')
    result = invoke([str(run), '--out', str(run / 'c.png')])
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == f'note: {run}: no stats.jsonl, no timing from this folder'
    with PIL.Image.open(run / 'c.png') as image:
        assert image.size == (3 * pc.PANEL_W, pc.PANEL_H)


def test_resumed_parts_add_up(run, tmp_path):
    part = tmp_path / 'part2'
    part.mkdir()
    write_lines(part / 'metric-a.jsonl', [metric_record(4, a=0.125), metric_record(6, a=0.1)])
    write_lines(part / 'stats.jsonl', [stats_record(5, 90.0, 1800.0)])
    result = invoke([str(run), str(part), '--out', str(tmp_path / 'c.png')])
    assert result.exit_code == 0 and result.output == f'wrote {tmp_path / "c.png"}: 3 curves, 3 ticks\n'
    curves, timing, total_sec = pc.read_runs([str(run), str(part)])
    assert curves['a'] == {0.0: 0.5, 2.0: 0.3, 4.0: 0.125, 6.0: 0.1}
    assert timing == [(1.0, 200.0), (3.0, 100.0), (5.0, 90.0)] and total_sec == 5400.0


def test_errors(run, tmp_path):
    assert error_line(invoke([str(tmp_path / 'nope')])) == f'Error: {tmp_path / "nope"}: no such run folder'
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert error_line(invoke([str(empty)])) == (f'Error: {empty}: no metric-*.jsonl results (evaluate snapshots with '
                                                'train.py --metrics=... or calc_metrics.py)')
    assert error_line(invoke([str(run), '--out', str(tmp_path / 'c.jpg')])) == f'Error: {tmp_path / "c.jpg"}: --out must name a .png file'
    assert error_line(invoke([str(run), '--out', str(tmp_path / 'no' / 'c.png')])) == f'Error: {tmp_path / "no" / "c.png"}: its folder does not exist'
    bad = run / 'metric-c.jsonl'
    write_lines(bad, [metric_record(0, c=1.0), '{"results": {"c": 1.0}, "snapshot_pkl": "network-snap'])
    assert error_line(invoke([str(run)])) == f'Error: {bad}: line 2: not JSON (Unterminated string starting at)'
    write_lines(bad, [dict(metric_record(0), snapshot_pkl='my-model.pkl', results=dict(c=1.0))])
    assert error_line(invoke([str(run)])) == (f"Error: {bad}: line 1: snapshot_pkl 'my-model.pkl' is not a "
                                              'network-snapshot-KKKKKK.KKK.pkl name')
    write_lines(bad, [metric_record(0, c='high')])
    assert error_line(invoke([str(run)])) == f'Error: {bad}: line 1: expected "results": {{name: number, ...}}'
    os.remove(bad)
    write_lines(run / 'stats.jsonl', [stats_record(1, 2.0, 3.0), {'Progress/kimg': {'mean': 1}}])
    assert error_line(invoke([str(run)])) == (f'Error: {run / "stats.jsonl"}: line 2: expected Progress/kimg, Timing/sec_per_kimg '
                                              "and Timing/total_sec as {\"mean\": number} (KeyError('Timing/sec_per_kimg') is missing)")
    assert not (run / 'curves.png').exists()


def test_a_snapshot_saved_under_its_first_free_name_counts_at_its_kimg(run):
    # save_snapshot names a snapshot network-snapshot-KKKKKK.KKK-N.pkl when another file holds the plain name.
    write_lines(run / 'metric-a.jsonl', [metric_record(0, a=0.5), dict(metric_record(6, a=0.2), snapshot_pkl='network-snapshot-000006.000-1.pkl')])
    curves = {}
    pc.read_metrics(str(run), curves)
    assert curves['a'] == {0.0: 0.5, 6.0: 0.2}


def test_a_tick_whose_value_is_not_a_number_names_the_file(run):
    write_lines(run / 'stats.jsonl', [stats_record(1, 2.0, 3.0), stats_record(2, 'fast', 4.0)])
    assert error_line(invoke([str(run)])) == (f'Error: {run / "stats.jsonl"}: line 2: expected Progress/kimg, Timing/sec_per_kimg '
                                              "and Timing/total_sec as {\"mean\": number} ('fast' is not a number)")


def test_ticks_that_are_not_finite_are_left_out(run):
    write_lines(run / 'stats.jsonl', [stats_record(1, float('nan'), 250.0), stats_record(3, 100.0, 300.0),
                                      stats_record(5, float('inf'), 350.0)])
    result = invoke([str(run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert result.output == f'wrote {run / "curves.png"}: 3 curves, 1 ticks\n'
