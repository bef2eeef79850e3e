"""Evaluation reports: the paper's table in markdown, a PNG plot, and the side-by-side comparison of several runs."""

import json
from pathlib import Path


ROWS = [
    ("Accuracy@t1", "accuracy_t1"),
    ("Accuracy@t2", "accuracy_t2"),
    ("Δ(t1,t2)", "delta"),
    ("Δi→c(t1,t2)", "incorrect_to_correct"),
    ("Δc→i(t1,t2)", "correct_to_incorrect"),
    ("no edit (y2 = y1)", "no_edit"),
    ("mean edit distance", "mean_edit_distance"),
]


def _cell(summary: dict, key: str) -> str:
    value = summary[key]
    if key == "mean_edit_distance":
        return f"{value:.1f}"
    ci = summary.get(f"{key}_ci")
    return f"{100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def markdown_table(summaries: list[dict], labels: list[str]) -> str:
    """Metrics as rows, runs as columns; percentages with 95% intervals (Wilson for accuracies, bootstrap for Δ)."""
    lines = [
        "| metric | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
        "| problems | " + " | ".join(str(s["n"]) for s in summaries) + " |",
    ]
    lines += [f"| {name} | " + " | ".join(_cell(s, key) for s in summaries) + " |" for name, key in ROWS]
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], labels: list[str], path: str | Path) -> Path:
    """Acc@t1 vs Acc@t2 per run (left) and the transitions i→c / c→i per run (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(labels))
    width = 0.38
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 2 * len(labels), 3.6))
    for offset, key, name in ((-width / 2, "accuracy_t1", "Acc@t1"), (width / 2, "accuracy_t2", "Acc@t2")):
        values = [100 * s[key] for s in summaries]
        errors = [
            [100 * (s[key] - s[f"{key}_ci"][0]) for s in summaries],
            [100 * (s[f"{key}_ci"][1] - s[key]) for s in summaries],
        ]
        left.bar([i + offset for i in x], values, width, yerr=errors, capsize=3, label=name)
    left.set_ylabel("accuracy (%)")
    left.set_title("first vs second attempt")
    for offset, key, name, color in (
        (-width / 2, "incorrect_to_correct", "incorrect→correct", "tab:green"),
        (width / 2, "correct_to_incorrect", "correct→incorrect", "tab:red"),
    ):
        right.bar([i + offset for i in x], [100 * s[key] for s in summaries], width, label=name, color=color)
    right.set_ylim(
        0, max(5.0, *(100 * s[k] for s in summaries for k in ("incorrect_to_correct", "correct_to_incorrect"))) * 1.15
    )
    right.set_ylabel("share of problems (%)")
    right.set_title("transitions between attempts")
    for axis in (left, right):
        axis.set_xticks(list(x), labels)
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
