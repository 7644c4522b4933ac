"""``python -m fluxmq``: the same as ``fluxmq-node`` (run a node; ``--help`` for the options)."""

import sys

from fluxmq.node.cli import main

if __name__ == "__main__":
    sys.exit(main())
