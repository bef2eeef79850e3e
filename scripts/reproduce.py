"""The self-correction result and its ablations (see score_trl/cli/reproduce.py):

python scripts/reproduce.py recipes/reproduce/smollm2_cpu.yaml [--arms score rloo] [--flag value ...]
"""

from score_trl.cli.reproduce import cli


if __name__ == "__main__":
    cli()
