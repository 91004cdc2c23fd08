"""``python -m lowrank_attn.cli``: the ``lowrank-attn`` command."""

import sys

from . import entry

sys.exit(entry())
