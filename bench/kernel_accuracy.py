"""What the CPU kernels' int8 activations (W4A8) cost in quality: WikiText-2 perplexity of packed SmolLM2-135M
models computed with the exact reference ops and with the C kernels, same weights, same windows; and what
quantizing the output head too (`lm_head=True`, which the decode benchmark uses) costs.
Writes docs/results/kernel_accuracy.{md,json}.

    python bench/kernel_accuracy.py --windows 8
"""

from __future__ import annotations

import time

from common import bench_parser, markdown_table, preset_settings, start_bench, write_results

from hf_compress_prompt.compressors import Recipe, compress_
from hf_compress_prompt.kernels import reference_only
from hf_compress_prompt.nn import layer_status

SETTINGS = preset_settings({  # row label -> preset
    "RTN 4-bit g64": "rtn-w4-g64",
    "RTN 4-bit g64 + 4-bit head": "rtn-w4-g64-head4",
    "RTN 4-bit g64 + 8-bit head": "rtn-w4-g64-head8",
    "magnitude 2:4 + RTN 4-bit g64": "magnitude-2:4+rtn-w4-g64",
    "SparseGPT 50% + 4-bit g64 (joint)": "sparsegpt-50%+w4-g64",
})


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.evaluation import perplexity
    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = bench_parser(__doc__, threads=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--output", default="kernel_accuracy", help="results name (default: kernel_accuracy)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows for SparseGPT (x 512 tokens)")
    args, machine = start_bench(parser, argv)
    records = []
    for name in args.settings:
        model, tokenizer = load_model_and_tokenizer()
        from hf_compress_prompt.compressors import CalibrationConfig

        compress_(model, Recipe(SETTINGS[name], CalibrationConfig(nsamples=args.nsamples)), tokenizer=tokenizer,
                  progress=False)
        kernels = sorted(set(layer_status(model).values()))
        ids = eval_tokens("wikitext2", tokenizer, "test")
        record = {"setting": name, "kernels": kernels}
        for mode in ("reference", "kernels"):
            start = time.perf_counter()
            if mode == "reference":
                with reference_only():
                    r = perplexity(model, ids, seqlen=2048, max_windows=args.windows, progress=False)
            else:
                r = perplexity(model, ids, seqlen=2048, max_windows=args.windows, progress=False)
            record[mode] = {"perplexity": r.perplexity, "windows": r.windows, "seconds": time.perf_counter() - start}
        records.append(record)
        print(f"{name}: reference {record['reference']['perplexity']:.3f}, kernels {record['kernels']['perplexity']:.3f}",
              flush=True)
        del model
    header = ["setting", "ppl, reference ops (exact)", "ppl, C kernels (W4A8)", "difference", "s reference", "s kernels"]
    rows = [[r["setting"], f"{r['reference']['perplexity']:.3f}", f"{r['kernels']['perplexity']:.3f}",
             f"{100 * (r['kernels']['perplexity'] / r['reference']['perplexity'] - 1):+.2f}%",
             f"{r['reference']['seconds']:.0f}", f"{r['kernels']['seconds']:.0f}"] for r in records]
    notes = (
        f"WikiText-2 test, first {args.windows} windows of 2048 tokens, fp32 model (activations fp32 into the "
        "kernels, quantized by them to int8 per 64 inputs); the same packed weights scored twice: with "
        "`hf_compress_prompt.kernels.reference_only()` (de-quantize, then fp32 matmul) and with the C kernels. "
        f"{args.threads} threads. SparseGPT calibrated on {args.nsamples} x 512 C4 tokens. Times include every "
        "layer, not only the linears; the kernels are built for decoding (few tokens), so long prompts are not "
        "where they are fast."
    )
    settings = {"settings": args.settings, "windows": args.windows, "threads": args.threads, "nsamples": args.nsamples}
    path = write_results(args.output, title="Perplexity with the CPU kernels vs the exact reference ops",
                         settings=settings, machine=machine, table=markdown_table(header, rows), records=records,
                         notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
