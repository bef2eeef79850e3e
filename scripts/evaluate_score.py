"""Self-correction evaluation, TRL-script style (the code lives in score_trl.cli.evaluate, also installed as
`score-eval`).

    python scripts/evaluate_score.py --model_name_or_path MODEL --adapter RUN --benchmark gsm8k --output_dir eval/run
    python scripts/evaluate_score.py --compare eval/base eval/run --labels base SCoRe --output_dir eval/compare
"""

from score_trl.cli.evaluate import main, parse_args


__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    main(*parse_args())
