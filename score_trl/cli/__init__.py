"""Entry points and experiments built on the library: `score-train` (train.py), `score-eval` (evaluate.py), the
reproduction (`score-reproduce`: reproduce.py, arithmetic.py, curves.py), the benchmark (`score-benchmark`) and the
report tables and plots they share (report.py). Nothing in `score_trl` imports from here."""
