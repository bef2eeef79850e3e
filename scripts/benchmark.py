"""SCoRe vs TRL's RLOOTrainer at equal generated tokens: step time, phases, tokens/s, peak memory (see
experiments/benchmark.py).

python scripts/benchmark.py                                   # CPU: SmolLM2-135M-Instruct
python scripts/benchmark.py --model gemma2-2b --load_in_4bit  # GPU: gemma-2-2b architecture, nf4 + LoRA r=32
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's experiments/, not installed
from experiments.benchmark import cli  # noqa: E402


if __name__ == "__main__":
    cli()
