"""Reports a person reads: markdown and HTML with tables and PNG plots (matplotlib) of task scores per model and
of perplexity per compression setting with and without the recovery prompt.

Inputs are the JSON files the package writes: a task report (:meth:`TaskReport.save`, ``hf-compress-prompt
evaluate-tasks --output``) and, optionally, perplexities in either of two shapes: ``bench/recovery.py``'s
``docs/results/recovery.json``, or ``{"dense": {dataset: ppl}, "settings": {name: {"compressed": {dataset: ppl},
"recovered": {dataset: ppl}}}}``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..errors import MissingResourceError, UserInputError
from .tasks.runner import TaskReport

__all__ = ["plot_perplexities", "read_perplexities", "write_report"]


def read_perplexities(path: str | Path) -> dict:
    """``{"dense": {dataset: ppl}, "settings": {name: {"compressed": {...}, "recovered": {...}}}}`` from either
    accepted file shape."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserInputError(f"{path} is not a readable JSON file ({error})") from None
    if isinstance(raw, dict) and "settings" in raw and "dense" in raw:
        return raw
    if isinstance(raw, dict) and isinstance(raw.get("results"), list):  # bench/recovery.py
        settings, dense = {}, None
        for record in raw["results"]:
            if "setting" in record:
                settings[record["setting"]] = {"compressed": record["compressed"], "recovered": record["recovered"]}
            elif "dense" in record:
                dense = record["dense"]
        if dense is not None and settings:
            return {"dense": dense, "settings": settings}
    raise UserInputError(f"{path} holds no perplexities in a known shape (see hf_compress_prompt.evaluation.report)")


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingResourceError("reports draw their plots with matplotlib: pip install matplotlib") from None
    return plt


def _task_plot(report: TaskReport, path: Path) -> Path:
    plt = _plt()
    models = list(report.results)
    tasks = list(dict.fromkeys(t for r in report.results.values() for t in r))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    for i, m in enumerate(models):
        values = [100 * report.results[m][t].score if t in report.results[m] else 0 for t in tasks]
        bars = ax.bar([x + i * width for x in range(len(tasks))], values, width, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(tasks))],
                  [f"{t}\n({next(r[t].primary for r in report.results.values() if t in r)})" for t in tasks], fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title("Knowledge-intensive tasks per model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_perplexities(ppl: dict, path: str | Path, title: str = "Perplexity per compression setting, with and without "
                      "the recovery prompt") -> Path:
    """A log-scale plot per dataset of perplexity per setting, compressed and with the prompt, dense as a line
    (the paper's Figure 3); ``ppl`` as :func:`read_perplexities` returns it."""
    plt = _plt()
    names = list(ppl["settings"])
    datasets = list(ppl["dense"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        x = range(len(names))
        ax.plot(x, [ppl["settings"][n]["compressed"][d] for n in names], "o-", label="compressed")
        ax.plot(x, [ppl["settings"][n]["recovered"][d] for n in names], "s-", label="compressed + prompt")
        ax.axhline(ppl["dense"][d], color="grey", ls="--", label="dense")
        ax.set_xticks(list(x), names, rotation=15, fontsize=8)
        ax.set_ylabel(f"{d} perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _perplexity_table(ppl: dict) -> tuple[list[str], list[list[str]]]:
    datasets = list(ppl["dense"])
    header = ["setting"] + [f"{d} {kind}" for d in datasets for kind in ("compressed", "+ prompt")]
    rows = [["dense"] + [f"{ppl['dense'][d]:.2f}" for d in datasets for _ in range(2)]]
    for name, s in ppl["settings"].items():
        rows.append([name] + [f"{s[kind][d]:.2f}" for d in datasets for kind in ("compressed", "recovered")])
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _task_rows(report: TaskReport) -> tuple[list[str], list[list[str]]]:
    models = list(report.results)
    held = report.holds()
    tasks = list(dict.fromkeys(t for r in report.results.values() for t in r))
    rows = []
    for t in tasks:
        first = next(r[t] for r in report.results.values() if t in r)
        cells = [f"{t} ({first.primary}, n={first.samples})"]
        for m in models:
            r = report.results[m].get(t)
            cell = "-" if r is None else f"{100 * r.score:.1f}"
            if r is not None and t in held.get(m, {}):
                cell += " holds" if held[m][t] else " drops"
            cells.append(cell)
        rows.append(cells)
    return ["task (metric, items)"] + models, rows


def write_report(output: str | Path, tasks: TaskReport | str | Path | None = None,
                 perplexities: dict | str | Path | None = None, title: str = "Compressed model report") -> dict[str, Path]:
    """Writes ``report.md``, ``report.html`` and the PNG plots into ``output``; returns their paths.

    Args:
        output: the folder (created).
        tasks: a :class:`TaskReport` or its JSON file.
        perplexities: the perplexities (see :func:`read_perplexities`) or their JSON file.
    """
    if tasks is None and perplexities is None:
        raise UserInputError("a report needs task results, perplexities or both")
    if isinstance(tasks, (str, Path)):
        tasks = TaskReport.load(tasks)
    if isinstance(perplexities, (str, Path)):
        perplexities = read_perplexities(perplexities)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    if perplexities is not None:
        written["perplexity_png"] = plot_perplexities(perplexities, out / "perplexity.png")
        header, rows = _perplexity_table(perplexities)
        md += ["## Perplexity", "", "![perplexity per setting](perplexity.png)", "", _markdown(header, rows), ""]
        body += ["<h2>Perplexity</h2>", '<img src="perplexity.png" alt="perplexity per setting">',
                 _html_table(header, rows)]
    if tasks is not None:
        written["tasks_png"] = _task_plot(tasks, out / "tasks.png")
        header, rows = _task_rows(tasks)
        rule = (f"A model holds a task when its score is at least {100 * (1 - tasks.epsilon):.0f}% of "
                f"{tasks.reference!r}'s (LLM-KICK's epsilon_0, read as a relative drop)." if tasks.reference else "")
        md += ["## Knowledge-intensive tasks", "", "![task scores](tasks.png)", "", _markdown(header, rows), "", rule,
               ""]
        body += ["<h2>Knowledge-intensive tasks</h2>", '<img src="tasks.png" alt="task scores">',
                 _html_table(header, rows), f"<p>{html.escape(rule)}</p>"]
        for name, results in tasks.results.items():
            for t, r in results.items():
                if r.groups and t.startswith("mmlu"):
                    continue  # per-subject MMLU tables are in the JSON; the report keeps to what a person reads
                for e in r.examples[:2]:
                    md.append(f"- {name} / {t}: `{json.dumps(e, ensure_ascii=False)[:300]}`")
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    written["markdown"], written["html"] = out / "report.md", out / "report.html"
    return written
