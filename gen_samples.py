"""gen_samples: filled in by a later issue."""

import sys

if __name__ == '__main__':
    print('gen_samples.py: not implemented yet', file=sys.stderr)
    sys.exit(2)
