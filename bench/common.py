"""What every benchmark shares: its start (:func:`bench_parser`, then :func:`start`: arguments, torch threads, the
machine), its named settings (:func:`preset_settings`, from :mod:`hf_compress_prompt.compressors.presets`), and what
it records (the machine, the settings, the date) with one writer for docs/results.

A benchmark runs as ``python bench/<name>.py``; Python puts ``bench/`` on the import path, so ``from common import
...`` needs no set-up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"


def bench_parser(doc: str | None, *, threads: int = 2, precision: bool = False) -> argparse.ArgumentParser:
    """The parser every benchmark starts from: its module docstring as the description, kept as written,
    ``--threads`` (torch CPU threads) and, with ``precision`` (benches that score or train in one precision, not
    those that time both), ``--precision`` (bf16 autocast or fp32), both recorded with the results."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default: {threads})")
    if precision:
        parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                            help="perplexity, task scoring and prompt training under bf16 autocast or in fp32; "
                                 "auto (default): bf16 where this machine's bf16 matmuls are fast (AVX-512 / AMX "
                                 "CPUs, CUDA), else fp32 (an AVX2-only CPU runs bf16 about 5x slower than fp32)")
    return parser


_BF16: bool | None = None  # what --precision resolved to (start_bench)


def start_bench(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """Parses ``argv``, sets torch's thread count, resolves ``--precision`` (``args.bf16``; :func:`bench_bf16`)
    and records the machine: the first line of every benchmark."""
    global _BF16
    from hf_compress_prompt.autocast import resolve_bf16

    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not hasattr(args, "precision"):
        return args, machine_info()
    device = getattr(args, "device", None) or "cpu"  # a bench's --device, where it has one
    args.bf16 = _BF16 = resolve_bf16(None if args.precision == "auto" else args.precision == "bf16", device)
    return args, {**machine_info(), "precision": f"{precision_label()} (--precision {args.precision})"}


def bench_bf16() -> bool:
    """Whether this bench scores and trains under bf16 autocast (``--precision``, resolved by :func:`start_bench`;
    before it, what ``auto`` gives here)."""
    if _BF16 is None:
        from hf_compress_prompt.autocast import bf16_matmul_is_fast

        return bf16_matmul_is_fast()
    return _BF16


def precision_label() -> str:
    """How this bench's results read the precision: ``"bf16 autocast"`` or ``"fp32"``."""
    return "bf16 autocast" if bench_bf16() else "fp32"


def preset_settings(labels: dict[str, str | None]) -> dict[str, list]:
    """Setting label (the name a results row carries) -> a fresh copy of the steps of the named preset (`None`: the
    dense model, no steps). The labels stay what earlier results files used, so rows stay comparable."""
    from hf_compress_prompt.compressors.presets import preset_steps

    return {label: preset_steps(name) if name else [] for label, name in labels.items()}


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


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int], repeats: int = 7) -> float:
    """Median GFLOP/s of ``(m, k) @ (k, n)`` in ``dtype`` (after two warm-up products)."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


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


def add_prompt_recipe_args(parser, *, steps: int = 64, eval_steps: int = 16) -> None:
    """The arguments of bench/recovery.py's prompt recipe and evaluation that the transfer benches share (a
    :func:`bench_parser` already has ``--threads``)."""
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per prompt")
    parser.add_argument("--seqlen", type=int, default=1024, help="tokens per training window")
    parser.add_argument("--batch", type=int, default=1, help="training windows per step")
    parser.add_argument("--lr", type=float, default=3e-2, help="prompt learning rate")
    parser.add_argument("--eval-steps", type=int, default=eval_steps, help="validate every this many steps")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 / PTB test windows of 2048 tokens")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows (x 512 tokens)")


def prompt_recipe(args, method: str = "PROMPT"):
    """The ``RecoveryConfig`` of :func:`add_prompt_recipe_args`' arguments (100 virtual tokens, 8 validation windows)
    for a prompt, or the same recipe for another ``method`` (PREFIX: a prefix without PEFT's projection)."""
    from hf_compress_prompt.recovery.train import RecoveryConfig

    return RecoveryConfig(method=method, num_virtual_tokens=100, seqlen=args.seqlen, max_steps=args.steps,
                          batch_size=args.batch, eval_steps=args.eval_steps, eval_windows=8, learning_rate=args.lr,
                          bf16=bench_bf16())


def eval_perplexities(model, ids: dict, windows: int) -> dict[str, float]:
    """Perplexity on each evaluation set of ``ids`` (name -> token ids): the first ``windows`` windows of 2048 tokens,
    in the bench's precision (:func:`bench_bf16`), as every recovery bench measures it."""
    from hf_compress_prompt.evaluation import perplexity

    return {d: perplexity(model, t, seqlen=2048, max_windows=windows, autocast_bf16=bench_bf16(),
                          progress=False).perplexity
            for d, t in ids.items()}
