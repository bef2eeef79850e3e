"""The self-correction result and its ablations (see experiments/reproduce.py):

python scripts/reproduce.py recipes/reproduce/smollm2_cpu.yaml [--arms score rloo] [--flag value ...]
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's experiments/, not installed
from experiments.reproduce import cli  # noqa: E402


if __name__ == "__main__":
    cli()
