"""GPTQ 4-bit g64 on SmolLM2 with variants of what its Hessian sees (issue 21, item 10: why GPTQ without act-order
ties round-to-nearest there). Writes docs/results/gptq_hessian_variants.{md,json}.

Each variant compresses the default model in its own process (C4 calibration, or the offline sample, 64 x 512 unless
the variant says otherwise, seed 0) and scores the first --windows WikiText-2 test windows (seqlen 2048, bf16 autocast
where this CPU's bf16 is fast, else fp32: --precision).

    python bench/gptq_hessian_variants.py                          # every variant (about 5 min each on 2 idle cores)
    python bench/gptq_hessian_variants.py --variants clip4 act
    python bench/gptq_hessian_variants.py --from-jsonl runs.jsonl  # render rows collected earlier by --jsonl

Variants: ``clip<k>`` caps each token's input norm at k x its batch's median before it enters H
(`HessianAccumulator(clip_token_norm=k)`); ``drop0`` leaves each window's first position (the attention sink) out of
H; ``act`` is act-order; ``n16x2048`` calibrates on 16 windows of 2048 tokens (the same token count).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time

from common import bench_bf16, bench_parser, markdown_table, precision_label, start_bench, write_results

VARIANTS = {  # name -> options
    "rtn": {"rtn": True},
    "plain": {},
    "act": {"act": True},
    "clip2": {"clip": 2.0},
    "clip3": {"clip": 3.0},
    "clip4": {"clip": 4.0},
    "act_clip4": {"act": True, "clip": 4.0},
    "drop0": {"drop0": True},
    "clip4_n16x2048": {"clip": 4.0, "nsamples": 16, "seqlen": 2048},
}


def run_one(name: str, windows: int) -> dict:
    import hf_compress_prompt.compressors.compress as compress_module
    import hf_compress_prompt.methods.hessian as hessian
    from hf_compress_prompt.compressors import CalibrationConfig, GPTQConfig, Recipe, RTNConfig, compress_
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.evaluation import perplexity
    from hf_compress_prompt.models import load_model_and_tokenizer

    opts = VARIANTS[name]
    if "clip" in opts:
        compress_module.compress_layerwise = functools.partial(compress_module.compress_layerwise,
                                                               clip_token_norm=opts["clip"])
    if opts.get("drop0"):
        add_batch = hessian.HessianAccumulator.add_batch

        def without_first_position(self, x):
            return add_batch(self, x[:, 1:] if x.dim() == 3 and not self.diagonal_only else x)

        hessian.HessianAccumulator.add_batch = without_first_position
    model, tokenizer = load_model_and_tokenizer()
    step = (RTNConfig(bits=4, group_size=64) if opts.get("rtn")
            else GPTQConfig(bits=4, group_size=64, act_order=bool(opts.get("act"))))
    calibration = CalibrationConfig(nsamples=opts.get("nsamples", 64), seqlen=opts.get("seqlen", 512))
    start = time.perf_counter()
    compress_(model, Recipe([step], calibration), tokenizer=tokenizer, pack=False, progress=False)
    seconds = time.perf_counter() - start
    r = perplexity(model, eval_tokens("wikitext2", tokenizer, "test"), seqlen=2048, max_windows=windows,
                   autocast_bf16=bench_bf16(), progress=False)
    return {"name": name, "opts": opts, "ppl": r.perplexity, "windows": r.windows, "compress_s": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, precision=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--windows", type=int, default=4, help="first N WikiText-2 test windows")
    parser.add_argument("--jsonl", help="also append each row to this file")
    parser.add_argument("--from-jsonl", help="render the rows of this file (written by --jsonl) instead of running")
    parser.add_argument("--note", default="", help="a sentence for the results file (e.g. when and under what load "
                        "the --from-jsonl rows were measured)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args, machine = start_bench(parser, argv)
    if args.run_one:
        print("RESULT " + json.dumps(run_one(args.run_one, args.windows)), flush=True)
        return
    if args.from_jsonl:
        records = [json.loads(line.removeprefix("RESULT ")) for line in open(args.from_jsonl) if line.startswith("RESULT ")]
    else:
        records = []
        for name in args.variants:
            proc = subprocess.run([sys.executable, __file__, "--run-one", name, "--windows", str(args.windows),
                                   "--threads", str(args.threads), "--precision", args.precision],
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"variant {name!r} failed:\n{proc.stderr[-3000:]}")
            records.append(json.loads(lines[-1].removeprefix("RESULT ")))
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(lines[-1] + "\n")
            print(f"{name}: {records[-1]['ppl']:.3f}", flush=True)
    rtn = next((r["ppl"] for r in records if r["name"] == "rtn"), None)
    rows = [[r["name"], json.dumps(r["opts"]), f"{r['ppl']:.3f}", f"{r['ppl'] / rtn:.3f}x" if rtn else "-",
             f"{r['compress_s']:.0f}"] for r in records]
    table = markdown_table(["variant", "options", f"wikitext2 ppl ({records[0]['windows']} windows)", "vs rtn",
                            "compress s"], rows)
    write_results("gptq_hessian_variants", title="GPTQ 4-bit g64 on SmolLM2: what its Hessian sees",
                  settings={"variants": [r["name"] for r in records], "windows": records[0]["windows"],
                            "seqlen": 2048, "precision": precision_label(), "threads": args.threads}, machine=machine,
                  table=table, records=records,
                  notes=(f"Rows rendered from {args.from_jsonl}, collected by an earlier run of the same code. "
                         if args.from_jsonl else "") + args.note)


if __name__ == "__main__":
    main()
