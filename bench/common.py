"""What every benchmark records: the machine, the settings and the date, and one writer for docs/results."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import platform
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """The facts a reader needs to compare figures across runs."""
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = os.getloadavg()
    return info


def any_of(names, extra: str = "") -> str:
    """An argparse help text listing the accepted names (argparse %-formats help, and setting names hold '%')."""
    return f"any of: {', '.join(names)}{extra}".replace("%", "%%")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, *, title: str, settings: dict, machine: dict, table: str, records: list[dict], notes: str = "") -> Path:
    """Writes ``docs/results/<name>.md`` (the table a person reads) and ``<name>.json`` (the same figures)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if hasattr(os, "getloadavg"):
        machine = {**machine, "loadavg_at_end": os.getloadavg()}
    payload = {"benchmark": name, "date": when, "settings": settings, "machine": machine, "results": records}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    settings_md = "\n".join(f"- {k}: `{v}`" for k, v in settings.items())
    machine_md = "\n".join(f"- {k}: `{v}`" for k, v in machine.items())
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else f"{name}.py"
    text = f"# {title}\n\nMeasured {when} by `bench/{script}`.\n\n{table}\n\n{notes}\n\n## Settings\n{settings_md}\n\n## Machine\n{machine_md}\n"
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    return path
