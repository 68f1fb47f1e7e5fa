"""calc_metrics: filled in by a later issue."""

import sys

if __name__ == '__main__':
    print('calc_metrics.py: not implemented yet', file=sys.stderr)
    sys.exit(2)
