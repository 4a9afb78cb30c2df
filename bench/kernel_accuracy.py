"""What the CPU kernels' int8 activations (W4A8) cost in quality: WikiText-2 perplexity of packed SmolLM2-135M
models computed with the exact reference ops and with the C kernels, same weights, same windows; and what
quantizing the output head too (`lm_head=True`, which the decode benchmark uses) costs.
Writes docs/results/kernel_accuracy.{md,json}.

    python bench/kernel_accuracy.py --windows 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, write_results  # noqa: E402

from hf_compress_prompt.compressors import MagnitudeConfig, Recipe, RTNConfig, SparseGPTConfig, compress_  # noqa: E402
from hf_compress_prompt.kernels import reference_only  # noqa: E402
from hf_compress_prompt.nn import layer_status  # noqa: E402

SETTINGS = {
    "RTN 4-bit g64": [RTNConfig(bits=4, group_size=64)],
    "RTN 4-bit g64 + 4-bit head": [RTNConfig(bits=4, group_size=64, lm_head=True)],
    "RTN 4-bit g64 + 8-bit head": [RTNConfig(bits=4, group_size=64, lm_head=True, lm_head_bits=8)],
    "magnitude 2:4 + RTN 4-bit g64": [MagnitudeConfig(sparsity="2:4"), RTNConfig(bits=4, group_size=64)],
    "SparseGPT 50% + 4-bit g64 (joint)": [SparseGPTConfig(sparsity=0.5, bits=4, group_size=64)],
}


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.evaluation import perplexity
    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--output", default="kernel_accuracy", help="results name (default: kernel_accuracy)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows for SparseGPT (x 512 tokens)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info()
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
