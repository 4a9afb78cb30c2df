"""Perplexity of SmolLM2-135M-Instruct under each compression setting, with compression wall time and peak memory.
Writes docs/results/compression_quality.{md,json}.

Each setting runs in its own subprocess (so its peak RSS is its own): load the default model, compress it with the
recipe, then score WikiText-2 and PTB test (seqlen 2048, bf16 autocast where this CPU's bf16 is fast, else fp32: --precision) on the first --windows windows.

    python bench/compression_quality.py                        # every setting, all windows (hours on 2 cores)
    python bench/compression_quality.py --windows 16           # the same settings on a subset of windows
    python bench/compression_quality.py --settings dense gptq-w4-g64 --windows 8

The dense baseline was published as Q4_1 GGUF (4-bit blocks of 32 with a float scale and minimum): every setting here
re-compresses weights that already carry that rounding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import (
    any_of,
    bench_bf16,
    bench_parser,
    markdown_table,
    precision_label,
    preset_settings,
    start_bench,
    write_results,
)

from hf_compress_prompt.compressors import CalibrationConfig, Recipe

_PLAIN = ["rtn-w4-perchannel", "rtn-w4-g64",  # rtn-w4-g64: GPTQ's g64 rows must beat this on the same grid
          "gptq-w4-perchannel", "gptq-w4-g64", "gptq-w4-g64-noactorder", "gptq-w3-g64", "sparsegpt-50%", "sparsegpt-2:4",
          "wanda-50%", "wanda-2:4", "magnitude-50%"]
SETTINGS: dict[str, list] = preset_settings({  # row label -> preset (the labels earlier results files use)
    "dense": None, **{name: name for name in _PLAIN},
    "sparsegpt-50%+w4-g64 (joint)": "sparsegpt-50%+w4-g64",
    "drop-20%-layers": "drop-20%-layers",
})
OPTIONAL_SETTINGS: dict[str, list] = preset_settings({
    "sparsegpt-50% then gptq-w4-g64": "sparsegpt-50%-then-gptq-w4-g64",
    "drop-20%-layers (block influence)": "drop-20%-layers-block-influence",
})



def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (VmHWM: ru_maxrss would start at the parent's size at the fork)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

def run_one(name: str, args: argparse.Namespace) -> dict:
    """Compress and score one setting in this process."""
    from hf_compress_prompt.compressors import compress_
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.evaluation import perplexity
    from hf_compress_prompt.models import load_model_and_tokenizer

    steps = {**SETTINGS, **OPTIONAL_SETTINGS}[name]
    model, tokenizer = load_model_and_tokenizer()
    record: dict = {"setting": name, "recipe": [s.to_dict() for s in steps]}
    compress_seconds = 0.0
    if steps:
        calibration = CalibrationConfig(nsamples=args.nsamples, seqlen=args.calib_seqlen)
        start = time.perf_counter()
        # pack=False: score the dense fake-quantized weights (packing is lossless, see tests/integrations) so the
        # perplexity pass does not also time the reference unpacking ops.
        result = compress_(model, Recipe(steps, calibration), tokenizer=tokenizer, pack=False, progress=False)
        compress_seconds = time.perf_counter() - start
        record["dropped_layers"] = sum((r.dropped_layers for r in result.reports), [])
        sparsities = [v["sparsity"] for r in result.reports for v in r.layers.values()]
        record["mean_sparsity"] = sum(sparsities) / len(sparsities) if sparsities else 0.0
    record["compress_seconds"] = compress_seconds
    record["peak_rss_mb_after_compress"] = _peak_rss_mb()
    for dataset in args.datasets:
        ids = eval_tokens(dataset, tokenizer, "test")
        r = perplexity(model, ids, seqlen=2048, max_windows=args.windows, autocast_bf16=bench_bf16(), progress=False)
        record[dataset] = {"perplexity": r.perplexity, "windows": r.windows, "tokens": r.tokens, "seconds": r.seconds}
    record["peak_rss_mb"] = _peak_rss_mb()
    return record


def write_table(records: list[dict], args: argparse.Namespace, machine: dict) -> Path:
    """Writes the results so far (the file says how many of the requested settings are in)."""
    dense = next((r for r in records if r["setting"] == "dense"), None)
    header = ["setting"] + [f"{d} ppl" for d in args.datasets]
    header += ([f"{d} vs dense" for d in args.datasets] if dense else []) + ["compress s", "peak RSS MB", "sparsity", "dropped"]
    rows = []
    for r in records:
        row = [r["setting"]] + [f"{r[d]['perplexity']:.3f}" for d in args.datasets]
        if dense:
            row += [f"{r[d]['perplexity'] / dense[d]['perplexity']:.3f}x" for d in args.datasets]
        row += [f"{r['compress_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r.get('mean_sparsity', 0):.3f}",
                ",".join(map(str, r.get("dropped_layers", []))) or "-"]
        rows.append(row)
    windows = {d: records[0][d]["windows"] for d in args.datasets}
    notes = (
        f"Perplexity: test splits, seqlen 2048, {precision_label()}, windows used: {windows} (the first N of each split). "
        f"Calibration: {args.nsamples} windows x {args.calib_seqlen} tokens from the local C4 train sample, seed 0. "
        "Each setting ran in its own process; 'compress s' is the wall time of compress_ (calibration sampling "
        "included), peak RSS is the process maximum (model load, compression and evaluation). Scored with the "
        "dense fake-quantized / zeroed weights (compress_(pack=False)); packing them is lossless. The dense baseline is the de-quantized "
        "Q4_1 GGUF, which already carries 4-bit rounding."
    )
    settings = {"settings": args.settings, "datasets": args.datasets, "windows": args.windows or "all", "seqlen": 2048,
                "precision": precision_label(), "calibration": f"c4 {args.nsamples} x {args.calib_seqlen}", "threads": args.threads}
    if len(records) < len(args.settings):
        notes = f"**Partial run: {len(records)} of {len(args.settings)} settings so far.** " + notes
    return write_results(args.name, title="Compression quality on SmolLM2-135M-Instruct", settings=settings,
                         machine=machine, table=markdown_table(header, rows), records=records, notes=notes)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, threads=2, precision=True)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help=any_of([*SETTINGS, *OPTIONAL_SETTINGS]))
    parser.add_argument("--datasets", nargs="+", default=["wikitext2", "ptb"])
    parser.add_argument("--windows", type=int, default=None, help="first N test windows per dataset (default: all)")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows from the C4 sample")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="calibration window length")
    parser.add_argument("--name", default="compression_quality", help="results file stem under docs/results/")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args, machine = start_bench(parser, argv)

    if args.run_one:
        print("RESULT " + json.dumps(run_one(args.run_one, args)), flush=True)
        return

    unknown = [s for s in args.settings if s not in SETTINGS and s not in OPTIONAL_SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}")
    records = []
    passthrough = ["--datasets", *args.datasets, "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen),
                   "--threads", str(args.threads), "--precision", args.precision] + (["--windows", str(args.windows)] if args.windows else [])
    for name in args.settings:
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--run-one", name, *passthrough], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"setting {name!r} failed with exit code {proc.returncode}")
        record = json.loads(lines[-1][len("RESULT "):])
        records.append(record)
        print("   " + ", ".join(f"{d} {record[d]['perplexity']:.3f}" for d in args.datasets)
              + f", compress {record['compress_seconds']:.0f} s, peak RSS {record['peak_rss_mb']:.0f} MB", flush=True)
        path = write_table(records, args, machine)

    print(f"wrote {path}")


if __name__ == "__main__":
    main()
