"""The project's experiments, kept out of the installed package: the reproduction and its ablations (reproduce.py,
on generated arithmetic: arithmetic.py, transfer.py; its statistics and curves: pooled.py, curves.py) and the
SCoRe-against-RLOO benchmark (benchmark.py). Run them from the repository root, through `scripts/` or `make`."""
