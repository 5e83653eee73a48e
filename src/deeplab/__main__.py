"""`python -m deeplab ...` (and `torchrun -m deeplab train ...`)."""

import sys

from .cli import run

sys.exit(run())
