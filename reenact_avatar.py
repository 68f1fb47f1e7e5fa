"""reenact_avatar: filled in by a later issue."""

import sys

if __name__ == '__main__':
    print('reenact_avatar.py: not implemented yet', file=sys.stderr)
    sys.exit(2)
