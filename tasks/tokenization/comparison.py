"""A tokenizer comparison as a table and a chart: each candidate's fertility report, one row per language.

The Alexandria seed compared its two tokenizers by fertility on the same data; here any number of candidates (kind,
model type, vocabulary size) are trained on the tokenizer stage's one sample and encoded on its one fertility sample,
so the rows differ only by the vocabulary. The table is a list of flat rows (what `mlflow.log_table` takes as
columns); the chart puts each figure in its own panel, candidates side by side within each language.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.stage import atomic_path

FIGURES = ("tokens_per_word", "continued_word_share", "bytes_per_token", "vocab_use")


def comparison_rows(reports: dict[str, dict[str, Any]], chosen: str) -> list[dict[str, Any]]:
    """Flat rows (candidate, language, figures) from {candidate label: fertility report}."""
    rows = []
    for label, report in reports.items():
        for lang, figures in report["languages"].items():
            rows.append({"candidate": label, "kind": report["kind"], "vocab_size": report["vocab_size"],
                         "language": lang, "chosen": label == chosen,
                         **{key: figures[key] for key in (*FIGURES, "unknown_rate")}})
    return rows


def as_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The rows as {column: values}, the shape `mlflow.log_table` logs."""
    return {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}


def comparison_chart(rows: list[dict[str, Any]], path: Path) -> bool:
    """One bar panel per figure, a group of bars per language, a bar per candidate; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    candidates = list(dict.fromkeys(row["candidate"] for row in rows))
    languages = list(dict.fromkeys(row["language"] for row in rows))
    value = {(row["candidate"], row["language"]): row for row in rows}
    width = 0.8 / max(len(candidates), 1)
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(4 * len(FIGURES), 3.6))
    for ax, figure in zip(axes, FIGURES):
        for i, label in enumerate(candidates):
            xs = [j + i * width for j, lang in enumerate(languages) if (label, lang) in value]
            ys = [value[label, lang][figure] for lang in languages if (label, lang) in value]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks([j + width * (len(candidates) - 1) / 2 for j in range(len(languages))], languages)
        ax.set_title(figure.replace("_", " "))
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return True
