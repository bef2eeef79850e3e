"""SCoRe training, TRL-script style (the code lives in score_trl.cli.train, also installed as `score-train`).

accelerate launch scripts/train_score.py recipes/gemma2b.yaml
accelerate launch scripts/train_score.py recipes/gemma2b.yaml --max_steps 50 --output_dir my-run
"""

from score_trl.cli.train import main, parse_args


__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    main(*parse_args())
