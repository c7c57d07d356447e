"""Trial driver: the budget benchmark (benchmarks/generation.py --budgets) with the demo's tokeniser preset
replaced by argv[1], e.g. ``python benchmarks/trial_residual.py cpu-f16r2 --data DATA --budgets 30 --out OUT``."""

import sys
from pathlib import Path

from oasisvq import demo

sys.path.insert(0, str(Path(__file__).parent))
import generation

demo.PRESET = sys.argv[1]
sys.exit(generation.main(sys.argv[2:]))
