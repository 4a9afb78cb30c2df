"""Dense SmolLM2-135M-Instruct perplexity on WikiText-2 and PTB test (seqlen 2048, all windows), fp32 and bf16
autocast, with tokens/s. Writes docs/results/baseline_ppl.{md,json}.

    python bench/baseline_ppl.py                       # the full run (all windows; ~45 min on 2 cores)
    python bench/baseline_ppl.py --max-windows 8       # a quick subset

The model was published as Q4_1 GGUF: this "dense" baseline already carries that 4-bit rounding.
"""

from __future__ import annotations

from common import bench_parser, markdown_table, start_bench, write_results

from hf_compress_prompt.data import eval_tokens
from hf_compress_prompt.evaluation import perplexity
from hf_compress_prompt.models import load_model_and_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, threads=2)
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--datasets", nargs="+", default=["wikitext2", "ptb"])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None, help="first N windows only (default: all)")
    parser.add_argument("--name", default="baseline_ppl", help="results file stem under docs/results/")
    args, machine = start_bench(parser, argv)
    model, tokenizer = load_model_and_tokenizer(args.model)
    records, rows = [], []
    for dataset in args.datasets:
        ids = eval_tokens(dataset, tokenizer, "test")
        by_mode = {}
        for mode, bf16 in (("fp32", False), ("bf16 autocast", True)):
            result = perplexity(
                model, ids, seqlen=args.seqlen, max_windows=args.max_windows, autocast_bf16=bf16, desc=f"{dataset} {mode}"
            )
            by_mode[mode] = result
            records.append({"dataset": dataset, "mode": mode, **result.to_dict()})
            print(f"{dataset} {mode}: {result}", flush=True)
        fp32, bf16 = by_mode["fp32"], by_mode["bf16 autocast"]
        for mode, r in by_mode.items():
            rows.append(
                [
                    dataset,
                    mode,
                    f"{r.perplexity:.3f}",
                    f"{r.first_windows(8):.3f}",
                    r.windows,
                    r.tokens,
                    f"{r.tokens_per_second:.0f}",
                    f"{r.median_window_seconds:.2f}",
                    f"{fp32.median_window_seconds / r.median_window_seconds:.2f}x",
                ]
            )
        print(f"{dataset}: bf16 - fp32 perplexity = {bf16.perplexity - fp32.perplexity:+.4f}", flush=True)

    table = markdown_table(
        ["dataset", "mode", "perplexity", "first 8 windows", "windows", "tokens", "tokens/s (mean)", "median s/window", "speed vs fp32 (median)"],
        rows,
    )
    notes = (
        "Perplexity as in GPTQ/SparseGPT/Wanda: the test split joined (WikiText-2 with blank lines, PTB sentences with "
        "spaces), tokenized once, non-overlapping windows, exp of the mean next-token NLL. "
        "The model is SmolLM2-135M-Instruct de-quantized from its published Q4_1 GGUF, so this dense baseline already "
        "carries 4-bit (block 32) rounding. fp32 and bf16 ran one after the other in the same process; "
        "tokens/s is over all windows, the speed ratio compares median seconds per window."
    )
    settings = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, de-quantized to fp32)",
        "datasets": args.datasets,
        "split": "test",
        "seqlen": args.seqlen,
        "max_windows": args.max_windows or "all",
        "batch_size": 1,
        "threads": args.threads,
    }
    path = write_results(
        args.name, title="Dense baseline perplexity", settings=settings, machine=machine, table=table, records=records, notes=notes
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
