"""The feedback control's report (`recipes/reproduce/smollm2_feedback.yaml`): does SCoRe teach a 135M model to use
a verdict in its correction turn? Read from the records each arm's evaluations wrote, without feedback (the arm's
folder) and with a verdict (its `feedback_verdict/`):

- the per-seed table first: accuracies, Δ, the i→c and c→i counts with an exact McNemar test, the share told
  "incorrect" and how many of those changed their answer (does the model act on the verdict at all?), and per arm
  the tokens it sampled and the prompts it saw in training (from its log_history.json);
- the targets, per seed: score_verdict's Δ with feedback above base's and rloo's, McNemar p < 0.05 with more i→c than
  c→i, and its c→i no higher than base's;
- pooled over seeds: the mean of the per-seed values with a t-interval over seeds, and beside it a paired per-problem
  bootstrap interval that holds the trained models fixed (it says how precisely these models were measured, not how
  another seed's training would come out).
"""

import json
from pathlib import Path

from score_trl.config import CORRECT_THRESHOLD
from score_trl.evaluation import read_records
from score_trl.feedback import VERDICT_INCORRECT
from score_trl.rewards import last_number
from score_trl.stats import mcnemar_exact, stratified_bootstrap, t_interval

from .pooled import training_cost


ARMS = ("base", "rloo", "score_verdict")
FEEDBACK = {"none": "", "verdict": "feedback_verdict"}


def outcomes(records: list[dict]) -> list[tuple[bool, bool]]:
    """(correct at t1, correct at t2) per problem, in problem order."""
    ordered = sorted(records, key=lambda r: (r["index"], r["sample"]))
    return [(r["reward_1"] >= CORRECT_THRESHOLD, r["reward_2"] >= CORRECT_THRESHOLD) for r in ordered]


def row_stats(records: list[dict]) -> dict:
    pairs = outcomes(records)
    n = len(pairs)
    i2c = sum(not a and b for a, b in pairs)
    c2i = sum(a and not b for a, b in pairs)
    told = [r.get("feedback_1") == VERDICT_INCORRECT for r in records]
    # The arithmetic reward grades the last number, so "changed its answer" reads that (as scoring.graded_answer does)
    acted = sum(last_number(r["attempt_1"]) != last_number(r["attempt_2"])
                for r, t in zip(records, told, strict=True) if t)  # fmt: skip
    return {
        "n": n,
        "acc1": sum(a for a, _ in pairs) / n,
        "acc2": sum(b for _, b in pairs) / n,
        "delta": (i2c - c2i) / n,
        "i2c": i2c,
        "c2i": c2i,
        "p": mcnemar_exact(i2c, c2i),
        "told": sum(told) / n if "feedback_1" in records[0] else None,
        "acted": (acted, sum(told)),
        "per_problem": [float(b) - float(a) for a, b in pairs],
    }


def load(output: Path) -> dict:
    """{(arm, seed, feedback): stats} for every evaluation on disk (base has seed None)."""
    found = {}
    for arm in ARMS:
        folders = [(None, output / "base")] if arm == "base" else []
        folders += [(int(f.parent.name[4:]), f) for f in sorted(output.glob(f"seed[0-9]*/{arm}"))]
        for seed, folder in folders:
            for mode, sub in FEEDBACK.items():
                path = folder / sub / "records.jsonl" if sub else folder / "records.jsonl"
                if (folder / "summary.json").is_file() and path.is_file():
                    found[(arm, seed, mode)] = row_stats(read_records(path, repair=False))
            if (arm, seed, "none") in found:
                found[(arm, seed, "cost")] = training_cost(folder)
    return found


def split_of(output: Path) -> str:
    """The split the runs in `output` were evaluated on, as their run.json files record it."""
    runs = [*output.glob("base/run.json"), *output.glob("seed[0-9]*/*/run.json")]
    splits = sorted({json.loads(p.read_text()).get("eval_split", "test") for p in runs})
    return f"{' and '.join(splits)} split" if splits else "split not recorded"


def feedback_cells(s: dict) -> tuple[str, str]:
    """The "told incorrect" and "of those, answer changed" cells of an evaluation's row ("–" without feedback)."""
    if s["told"] is None:
        return "–", "–"
    return pct(s["told"]), f"{s['acted'][0]} of {s['acted'][1]}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def report(output: Path) -> str:
    found = load(output)
    seeds = sorted({seed for (arm, seed, _) in found if seed is not None})
    lines = ["# Feedback control: SmolLM2-135M-Instruct, arithmetic, verdict in the correction turn", ""]
    lines += ["Written by `experiments/feedback_control.py` from the records in this folder. Greedy, two attempts, "
              f"{split_of(output)}; every model evaluated without feedback and with a verdict.", ""]  # fmt: skip
    lines += ["## Per seed", ""]
    lines += ["| seed | arm | evaluated with | Acc@t1 | Acc@t2 | Δ | i→c | c→i | McNemar p | told incorrect | "
              "of those, answer changed | sampled tokens | prompts |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for seed in seeds:
        for arm in ARMS:
            key_seed = None if arm == "base" else seed
            cost = found.get((arm, key_seed, "cost"))
            for mode in FEEDBACK:
                s = found.get((arm, key_seed, mode))
                if s is None:
                    continue
                told, acted = feedback_cells(s)
                spent = ("–", "–") if not cost else (f"{cost['sampled_tokens']:,}", str(cost["prompts"]))
                cells = [seed, arm, mode, pct(s["acc1"]), pct(s["acc2"]), signed(s["delta"]), s["i2c"], s["c2i"],
                         f"{s['p']:.3g}", told, acted, *spent]  # fmt: skip
                lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "base is not trained: its one evaluation stands in every seed's rows.", ""]
    lines += ["## Targets, per seed (evaluated with the verdict)", ""]
    lines += ["| seed | Δ(score_verdict) > Δ(base) | Δ(score_verdict) > Δ(rloo) | McNemar p < 0.05, i→c > c→i | "
              "c→i(score_verdict) ≤ c→i(base) |", "|---|---|---|---|---|"]  # fmt: skip
    for seed in seeds:
        score, base, rloo = (found.get((a, s, "verdict")) for a, s in (("score_verdict", seed), ("base", None),
                                                                         ("rloo", seed)))  # fmt: skip
        if score is None or base is None:
            continue
        cells = [
            mark(score["delta"] > base["delta"], f"{signed(score['delta'])} vs {signed(base['delta'])}"),
            "–"
            if rloo is None
            else mark(
                score["delta"] > rloo["delta"], f"{signed(score['delta'])} vs {signed(rloo['delta'])}"
            ),  # fmt: skip
            mark(
                score["p"] < 0.05 and score["i2c"] > score["c2i"],
                f"{score['i2c']} vs {score['c2i']}, p = {score['p']:.3g}",
            ),  # fmt: skip
            mark(score["c2i"] <= base["c2i"], f"{score['c2i']} vs {base['c2i']}"),
        ]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "## Pooled over seeds", ""]
    lines += ["Mean of the per-seed values. *t over seeds*: a 95% t-interval over the seeds (n − 1 degrees of "
              "freedom), what another training seed could give. *Problems, models fixed*: a 95% paired bootstrap over "
              "problems within each seed, conditioned on these trained models.", ""]  # fmt: skip
    lines += ["| arm | evaluated with | seeds | Acc@t1 | Acc@t2 | Δ | Δ: t over seeds | Δ: problems, models fixed |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm in ARMS:
        for mode in FEEDBACK:
            runs = [found[(arm, None if arm == "base" else s, mode)] for s in seeds
                    if (arm, None if arm == "base" else s, mode) in found]  # fmt: skip
            if not runs:
                continue
            if arm == "base":
                runs = runs[:1]
            deltas = t_interval([r["delta"] for r in runs])
            fixed = stratified_bootstrap([r["per_problem"] for r in runs])
            mean = sum(r["acc1"] for r in runs) / len(runs), sum(r["acc2"] for r in runs) / len(runs)
            lines.append(f"| {arm} | {mode} | {len(runs)} | {pct(mean[0])} | {pct(mean[1])} | "
                         f"{signed(deltas['mean'])} | {interval(deltas)} | {interval(fixed)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def mark(ok: bool, detail: str) -> str:
    return f"{'met' if ok else 'missed'} ({detail})"


def interval(result: dict) -> str:
    if result["low"] != result["low"]:  # NaN: one seed
        return "–"
    return f"[{signed(result['low'])}, {signed(result['high'])}]"


def learns(score: dict, base: dict) -> bool:
    """The budget search's rule for "learns" (fixed before its evaluations existed; `docs/results/feedback/README.md`):
    with the verdict, i→c above c→i with an exact McNemar p < 0.05, and c→i no higher than the base model's."""
    return score["i2c"] > score["c2i"] and score["p"] < 0.05 and score["c2i"] <= base["c2i"]


def budget_report(output: str | Path) -> str:
    """The budget search (issue 32, item 3) from the records in `output`: the base model (`base/`) and each checkpoint
    (`checkpoints/step<N>/<none|verdict>/`), all on the validation split; the rule in `learns`, per checkpoint."""
    output = Path(output)

    def stats(path: Path) -> dict | None:
        return row_stats(read_records(path, repair=False)) if path.is_file() else None

    base = stats(output / "base" / "feedback_verdict" / "records.jsonl")
    evaluations = [("base", "none", stats(output / "base" / "records.jsonl")), ("base", "verdict", base)]
    steps = sorted(int(f.name[4:]) for f in output.glob("checkpoints/step[0-9]*"))
    for step in steps:
        for mode in FEEDBACK:
            evaluations.append(
                (f"step {step}", mode, stats(output / "checkpoints" / f"step{step}" / mode / "records.jsonl"))
            )
    lines = ["| model | evaluated with | n | Acc@t1 | Acc@t2 | Δ | i→c | c→i | McNemar p | told incorrect | "
             "of those, answer changed | learns (rule) |", "|---" * 12 + "|"]  # fmt: skip
    for model, mode, s in evaluations:
        if s is None:
            continue
        told, acted = feedback_cells(s)
        rule = "–" if mode != "verdict" or model == "base" or base is None else ("yes" if learns(s, base) else "no")
        cells = [model, mode, s["n"], pct(s["acc1"]), pct(s["acc2"]), signed(s["delta"]), s["i2c"], s["c2i"],
                 f"{s['p']:.3g}", told, acted, rule]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def write_report(output: str | Path) -> Path:
    """results.md in `output`, with the runs' provenance (`experiments.reproduce.runs_markdown`)."""
    from .reproduce import runs_markdown

    output = Path(output)
    path = output / "results.md"
    path.write_text(report(output) + runs_markdown(output))
    return path
