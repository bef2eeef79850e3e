"""SCoRe vs TRL's RLOOTrainer at equal generated tokens: step time, phases, tokens/s, peak memory.

python scripts/benchmark.py                                   # CPU: SmolLM2-135M-Instruct
python scripts/benchmark.py --model gemma2-2b --load_in_4bit  # GPU: gemma-2-2b architecture, nf4 + LoRA r=32
"""

from score_trl.cli.benchmark import cli


if __name__ == "__main__":
    cli()
