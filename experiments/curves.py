"""Training curves from trainers' `state.log_history`: turn-1 and turn-2 reward and their difference, and how the
second attempt revises the first (text changed, answer changed, incorrect→correct, correct→incorrect), against step;
one line per arm, the mean over its seeds."""

from pathlib import Path


def reward_series(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"turn1", "turn2", "delta"} -> [(step, value)] from a log history. SCoRe logs `turn{t}/reward` (the raw
    reward of attempt t, before any bonus); TRL's RLOOTrainer logs one `reward`, which is its only (first) turn, and
    has no turn 2 or delta."""
    series = {"turn1": [], "turn2": [], "delta": []}
    for entry in log_history:
        step = entry.get("step")
        first = entry.get("turn1/reward", entry.get("reward") if "turn2/reward" not in entry else None)
        second = entry.get("turn2/reward")
        if step is None or first is None:
            continue  # the end-of-training summary entry has no rewards
        series["turn1"].append((step, first))
        if second is not None:
            series["turn2"].append((step, second))
            series["delta"].append((step, second - first))
    return series


REVISION_KEYS = {
    "text_changed": "self_correction/text_changed",
    "answer_changed": "self_correction/answer_changed",
    "incorrect_to_correct": "self_correction/incorrect_to_correct",
    "correct_to_incorrect": "self_correction/correct_to_incorrect",
}


def revision_series(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"text_changed", "answer_changed", "incorrect_to_correct", "correct_to_incorrect"} -> [(step, value)]: the
    shares of sampled second attempts that change the first's text, its answer, and its correctness, per step (SCoRe
    only; RLOO has no second attempt in training)."""
    return {
        name: [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        for name, key in REVISION_KEYS.items()
    }


def mean_over_seeds(series: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Per step, the mean over the seeds that logged it."""
    by_step: dict[int, list[float]] = {}
    for points in series:
        for step, value in points:
            by_step.setdefault(step, []).append(value)
    return [(step, sum(v) / len(v)) for step, v in sorted(by_step.items())]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start), so a curve starts at its first step."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_curves(histories: dict[str, list[list[dict]]], path: str | Path, window: int = 8) -> Path:
    """Two rows of panels, one line per arm (the mean over its seeds' histories; per-step values faint, their trailing
    mean over `window` steps solid): turn-1 reward, turn-2 reward, their difference; then the shares of second
    attempts whose text changed, whose answer changed, and that went incorrect→correct (solid) and
    correct→incorrect (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [
        ("turn1", "turn-1 reward (sampled)"),
        ("turn2", "turn-2 reward (sampled)"),
        ("delta", "turn-2 − turn-1 reward"),
        ("text_changed", "2nd attempt: text changed"),
        ("answer_changed", "2nd attempt: answer changed"),
        ("incorrect_to_correct", "i→c (solid), c→i (dashed)"),
    ]
    for i, (arm, runs) in enumerate(histories.items()):
        color, seeds = f"C{i}", f"{len(runs)} seed{'s' * (len(runs) > 1)}"
        series = [reward_series(h) | revision_series(h) for h in runs]
        for axis, (key, title) in zip(axes.flat, panels, strict=True):
            keys = [key, "correct_to_incorrect"] if key == "incorrect_to_correct" else [key]
            for k, style in zip(keys, ("-", "--"), strict=False):
                points = mean_over_seeds([s[k] for s in series])
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8, linestyle=style)
                label = f"{arm} ({seeds})" if (axis is axes.flat[0] and style == "-") else None
                axis.plot(steps, moving_average(list(values), window), color=color, linestyle=style, label=label)
            axis.set_title(title)
            axis.set_xlabel("step")
    axes[0, 2].axhline(0.0, color="gray", linewidth=0.6)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
