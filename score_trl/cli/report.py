"""Evaluation reports: the paper's table in markdown, a PNG plot, and the side-by-side comparison of several runs."""

import json
import re
from pathlib import Path

from ..stats import transition_key, transition_pairs


_PAIR = re.compile(r"(incorrect_to_correct|correct_to_incorrect)_t(\d+)_t(\d+)")


def rows_for(summaries: list[dict]) -> list[tuple[str, str]]:
    """(label, key) rows for runs of up to K attempts, keys as `score_trl.stats` names them: Acc@t per attempt, Δ and
    the transitions between the first and the last attempt, then per consecutive pair when some run has more than
    two, then the edits of the last attempt."""
    k = max(s.get("num_attempts", 2) for s in summaries)
    last = f"t{k}" if all(s.get("num_attempts", 2) == k for s in summaries) else "tK"
    rows = [(f"Accuracy@t{t}", f"accuracy_t{t}") for t in range(1, k + 1)]
    rows.append((f"Δ(t1,{last})", "delta"))
    for t, u in transition_pairs(k):
        pair = f"t1,{last}" if (t, u) == (1, k) else f"t{t},t{u}"
        rows += [(f"Δi→c({pair})", transition_key("incorrect_to_correct", t, u, k))]
        rows += [(f"Δc→i({pair})", transition_key("correct_to_incorrect", t, u, k))]
    if any(f"told_incorrect_t{k - 1}" in s for s in summaries):
        rows += [("told incorrect (before the last attempt)", f"told_incorrect_t{k - 1}")]
    rows += [("no edit (last = previous attempt)", "no_edit"), ("answer changed (last vs previous)", "answer_changed")]
    rows += [("mean edit distance", "mean_edit_distance")]
    return rows


def _value(summary: dict, key: str):
    # A pair's row reads each run under that run's own key: for a two-attempt run, t1 -> t2 is its first -> last
    pair = _PAIR.fullmatch(key)
    if pair:
        key = transition_key(pair[1], int(pair[2]), int(pair[3]), summary.get("num_attempts", 2))
    return summary.get(key)


def _cell(summary: dict, key: str) -> str:
    value = _value(summary, key)
    if value is None:
        return "–"
    if key == "mean_edit_distance":
        return f"{value:.1f}"
    ci = summary.get(f"{key}_ci")
    return f"{100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def markdown_table(summaries: list[dict], labels: list[str]) -> str:
    """Metrics as rows, runs as columns; percentages with 95% intervals (Wilson for accuracies, bootstrap for Δ); the
    feedback each run's correction turn carried (`score-eval --correction_feedback`), so that intrinsic and feedback
    runs compare side by side.
    Runs with different numbers of attempts share the table; a run shows – where it has no such attempt."""
    lines = [
        "| metric | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
        "| problems | " + " | ".join(str(s["n"]) for s in summaries) + " |",
        "| correction feedback | " + " | ".join(s.get("correction_feedback", "none") for s in summaries) + " |",
    ]
    for name, key in rows_for(summaries):
        lines.append(f"| {name} | " + " | ".join(_cell(s, key) for s in summaries) + " |")
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], labels: list[str], path: str | Path) -> Path:
    """Accuracy against attempt with 95% intervals, one line per run (left), and the transitions i→c / c→i between
    the first and the last attempt per run (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(labels))
    width = 0.38
    fig, (left, right) = plt.subplots(1, 2, figsize=(8 + len(labels), 3.6))
    for i, (summary, label) in enumerate(zip(summaries, labels, strict=True)):
        attempts = list(range(1, summary.get("num_attempts", 2) + 1))
        values = [100 * summary[f"accuracy_t{t}"] for t in attempts]
        errors = [
            [100 * (summary[f"accuracy_t{t}"] - summary[f"accuracy_t{t}_ci"][0]) for t in attempts],
            [100 * (summary[f"accuracy_t{t}_ci"][1] - summary[f"accuracy_t{t}"]) for t in attempts],
        ]
        offset = (i - (len(labels) - 1) / 2) * 0.04  # keep overlapping intervals apart
        left.errorbar([t + offset for t in attempts], values, yerr=errors, marker="o", capsize=3, label=label)
    left.set_xticks(range(1, max(s.get("num_attempts", 2) for s in summaries) + 1))
    left.set_xlabel("attempt")
    left.set_ylabel("accuracy (%)")
    left.set_title("accuracy by attempt")
    for offset, key, name, color in (
        (-width / 2, "incorrect_to_correct", "incorrect→correct", "tab:green"),
        (width / 2, "correct_to_incorrect", "correct→incorrect", "tab:red"),
    ):
        right.bar([i + offset for i in x], [100 * s[key] for s in summaries], width, label=name, color=color)
    right.set_ylim(
        0, max(5.0, *(100 * s[k] for s in summaries for k in ("incorrect_to_correct", "correct_to_incorrect"))) * 1.15
    )
    right.set_ylabel("share of problems (%)")
    right.set_title("first → last attempt")
    right.set_xticks(list(x), labels)
    for axis in (left, right):
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(summary: dict, output_dir: str | Path, label: str) -> dict[str, Path]:
    """summary.json, table.md and plot.png for one run."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": output_dir / "summary.json", "table": output_dir / "table.md", "plot": output_dir / "plot.png"}
    paths["summary"].write_text(json.dumps({"label": label, **summary}, indent=2))
    paths["table"].write_text(markdown_table([summary], [label]))
    plot([summary], [label], paths["plot"])
    return paths


def compare_runs(run_dirs: list[str | Path], labels: list[str] | None, output_dir: str | Path) -> dict[str, Path]:
    """Put several evaluation runs (their summary.json) side by side: comparison.md and comparison.png."""
    summaries = [json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs]
    labels = labels or [s.get("label") or Path(d).name for s, d in zip(summaries, run_dirs, strict=True)]
    if len(labels) != len(summaries):
        raise ValueError(f"{len(labels)} labels for {len(summaries)} runs: give one label per run.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": output_dir / "comparison.md", "plot": output_dir / "comparison.png"}
    paths["table"].write_text(markdown_table(summaries, labels))
    plot(summaries, labels, paths["plot"])
    return paths
