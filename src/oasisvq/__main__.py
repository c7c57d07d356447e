"""``python -m oasisvq`` (and ``torchrun -m oasisvq train ...``)."""

import sys

from .cli import main

sys.exit(main())
