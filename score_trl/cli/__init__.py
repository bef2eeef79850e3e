"""Entry points built on the library: `score-train` (train.py), `score-eval` (evaluate.py), what they share
(common.py) and the report tables and plots of evaluations (report.py). Nothing in `score_trl` outside `cli` imports
from here. The experiments (reproduction, benchmark) live in the repository's `experiments/`, not in the package."""
