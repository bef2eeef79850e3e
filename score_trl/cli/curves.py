"""Training curves from trainers' `state.log_history`: turn-1 and turn-2 reward and their difference against step."""

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


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start), so a curve starts at its first step."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_curves(histories: dict[str, list[dict]], path: str | Path, window: int = 10) -> Path:
    """One panel each for turn-1 reward, turn-2 reward and turn-2 minus turn-1 reward, one line per arm: the
    per-step values faint, their trailing mean over `window` steps solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    titles = {
        "turn1": "turn-1 reward (sampled)",
        "turn2": "turn-2 reward (sampled)",
        "delta": "turn-2 − turn-1 reward",
    }
    for i, (arm, history) in enumerate(histories.items()):
        color = f"C{i}"
        for axis, (key, title) in zip(axes, titles.items(), strict=True):
            points = reward_series(history)[key]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            axis.plot(steps, moving_average(list(values), window), color=color, label=arm)
            axis.set_title(title)
            axis.set_xlabel("step")
    axes[2].axhline(0.0, color="gray", linewidth=0.6)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
