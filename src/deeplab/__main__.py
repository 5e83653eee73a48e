"""`python -m deeplab ...` (and `torchrun -m deeplab train ...`)."""

import sys

from .cli import main

sys.exit(main())
