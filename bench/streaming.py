"""Streaming compression (one decoder block in memory) against the in-memory path: peak resident memory and time
per block against model size. Writes docs/results/<output>.{md,json,png}.

Models: random-initialised Llama-shaped checkpoints written as bf16 safetensors (their weights' statistics do not
matter for memory and time), sized 0.1B / 0.5B / 1B / 3B parameters (--sizes) and 3B-8L (the 3B's blocks, 8 of them: peak memory against
depth at a fixed block size), plus --huge, a model larger than this
machine's memory (13B, 26 GB of bf16 on disk, streaming only). Each (size, method, path) runs in a fresh child
process whose peak resident memory (its VmHWM) is read by the parent when it exits; a child the kernel kills for
memory is reported as such. Methods: RTN 4-bit g64 and GPTQ 4-bit g64 with a small calibration (--nsamples x
--seqlen random token ids: the cost does not depend on the text). The in-memory path is what `compress --in-memory`
runs (load, compress_, save_pretrained); the streaming path is `compress_pretrained`. Both write the same bytes
(tests/compressors/test_streaming.py); --check-equal compares the folders here too.

    python bench/streaming.py                                    # 0.1B-3B, RTN and GPTQ, both paths
    python bench/streaming.py --huge --gptq-sizes 0.1B 0.5B --check-equal --smollm2 --repeats 2   # the reported run
    python bench/streaming.py --sizes 0.1B --methods rtn         # a smoke run
    python bench/streaming.py --sizes 3B --huge --methods rtn    # add the 13B model (26 GB on disk)
    python bench/streaming.py --smollm2-only                     # SmolLM2 only (output streaming_smollm2)

--smollm2 adds the real model (SmolLM2-135M-Instruct from its GGUF, converted once): GPTQ 4-bit g64 on --real-nsamples
C4 windows of 512 tokens through both paths, each repeated --repeats times alternately (time ratio of medians), and
WikiText-2 perplexity (first --windows windows of 2048, bf16 autocast where fast, else fp32) of both outputs.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import bench_parser, markdown_table, precision_label, start_bench, write_results

from hf_compress_prompt.formats.safetensors_stream import entry_of, write_safetensors

SHAPES = {  # name -> Llama config overrides (vocab 32000, 8 KV heads where the heads allow it)
    "0.1B": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 4},
    "0.5B": {"hidden_size": 1280, "intermediate_size": 3456, "num_hidden_layers": 20, "num_attention_heads": 20,
             "num_key_value_heads": 4},
    "1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 8},
    "3B": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 26, "num_attention_heads": 24,
           "num_key_value_heads": 8},
    "3B-8L": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 8, "num_attention_heads": 24,
              "num_key_value_heads": 8},  # the 3B's blocks, 8 of them: memory vs depth at a fixed block size
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40},
}
VOCAB = 32000
METHODS = {"rtn": {"method": "rtn", "bits": 4, "group_size": 64},
           "gptq": {"method": "gptq", "bits": 4, "group_size": 64}}

_CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
spec = json.loads(sys.argv[1])
from hf_compress_prompt.compressors import Recipe, step_from_dict, CalibrationConfig
recipe = Recipe([step_from_dict(spec["step"])], CalibrationConfig(nsamples=spec["nsamples"], seqlen=spec["seqlen"],
                                                                   batch_size=spec.get("batch_size", 8)))
if spec.get("real"):  # a real model: C4 windows sampled with its tokenizer (as the CLI does)
    from transformers import AutoTokenizer
    calibration = {"tokenizer": AutoTokenizer.from_pretrained(spec["src"])}
else:
    calibration = {"calibration_ids": torch.randint(0, spec["vocab"], (spec["nsamples"], spec["seqlen"]),
                                                    generator=torch.Generator().manual_seed(0))}
start = time.perf_counter()
if spec["path"] == "streaming":
    from hf_compress_prompt.compressors.streaming import compress_pretrained
    compress_pretrained(spec["src"], spec["dst"], recipe, progress=False, **calibration)
else:
    import hf_compress_prompt as hcp
    from hf_compress_prompt.compressors import compress_
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(spec["src"], dtype=torch.float32)
    compress_(model, recipe, progress=False, **calibration)
    hcp.save_pretrained(model, spec["dst"], tokenizer=calibration.get("tokenizer"))
# VmHWM: this process's own peak. ru_maxrss would not do: a child starts with the parent's resident size at the
# fork as its high-water mark and exec does not reset it, so it reported the bench's own size after writing a
# checkpoint whenever that was larger
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": int(hwm[0].split()[1]) / 1024 if hwm else None,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _params(shape: dict) -> int:
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * block + 2 * VOCAB * h + h


def write_random_checkpoint(folder: Path, shape: dict, shard_gb: float = 4.0) -> int:
    """A Llama checkpoint of random bf16 weights (std 0.02, norms 1) written tensor by tensor, never held whole;
    returns its size in bytes."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False, **shape)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    h, i, kv = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads * \
        config.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)})
    meta = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in shapes.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=int(shard_gb * 2**30))

    def make(name, shape):
        def tensor():
            seed = sum(ord(c) * (k + 1) for k, c in enumerate(name)) % 2**31
            if len(shape) == 1:
                return torch.ones(shape, dtype=torch.bfloat16)
            return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16()
        return tensor

    for file, names in split.filename_to_tensors.items():
        write_safetensors(folder / file, [entry_of(n, make(n, shapes[n]), dtype=torch.bfloat16, shape=shapes[n])
                                          for n in names], {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return sum(p.stat().st_size for p in folder.iterdir())


def run_child(spec: dict, threads: int, timeout: float) -> dict:
    """Runs one compression in a fresh process; its time, peak resident memory (its own VmHWM, MiB) and
    outcome."""
    env = {**os.environ, "BENCH_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"wall_seconds": time.perf_counter() - start, "error": f"over the {timeout:.0f} s limit"}
    record = {"wall_seconds": time.perf_counter() - start, "returncode": proc.returncode}
    if proc.returncode == 0:
        record.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        record["error"] = "killed (out of memory?)" if proc.returncode in (-9, 137) else proc.stderr.strip()[-400:]
    return record


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, threads=2, precision=True)
    parser.add_argument("--sizes", nargs="+", default=["0.1B", "0.5B", "1B", "3B-8L", "3B"], choices=[s for s in SHAPES
                                                                                            if s != "13B"])
    parser.add_argument("--huge", action="store_true", help="also the 13B model (26 GB of bf16; streaming, RTN)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--paths", nargs="+", default=["in-memory", "streaming"], choices=["in-memory", "streaming"])
    parser.add_argument("--gptq-sizes", nargs="+", default=None, metavar="SIZE",
                        help="run GPTQ only on these sizes (its column loop makes it slow on 2 threads: about 20 s "
                             "per 0.1B block); default: every size")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="calibration windows per forward pass through a block (the CLI's --batch-size): fewer "
                             "hold smaller activations; the bytes written may change with it (both paths alike)")
    parser.add_argument("--workdir", default="/tmp/hcp-bench-streaming", help="where the checkpoints are written")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    parser.add_argument("--check-equal", action="store_true", help="compare the two paths' output folders")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M: time ratio and perplexity")
    parser.add_argument("--smollm2-only", action="store_true", help="only the SmolLM2 part")
    parser.add_argument("--real-nsamples", type=int, default=64, help="SmolLM2's C4 calibration windows (x 512)")
    parser.add_argument("--repeats", type=int, default=3, help="SmolLM2 runs per path (alternating)")
    parser.add_argument("--windows", type=int, default=8, help="SmolLM2 WikiText-2 windows of 2048 tokens")
    parser.add_argument("--output", default=None, help="results name under docs/results (default: streaming, or "
                                                       "streaming_smollm2 with --smollm2-only)")
    args, machine = start_bench(parser, argv)
    work = Path(args.workdir)
    if args.smollm2_only:
        args.sizes, args.huge, args.smollm2 = [], False, True
    args.output = args.output or ("streaming_smollm2" if args.smollm2_only else "streaming")
    records = []
    plan = [(s, m, p) for s in args.sizes for m in args.methods for p in args.paths
            if m != "gptq" or args.gptq_sizes is None or s in args.gptq_sizes]
    if args.huge:
        plan.append(("13B", "rtn", "streaming"))
    for size in dict.fromkeys(s for s, _, _ in plan):
        src = work / f"src-{size}"
        if src.exists():
            shutil.rmtree(src)
        start = time.perf_counter()
        nbytes = write_random_checkpoint(src, SHAPES[size])
        print(f"{size}: {_params(SHAPES[size]) / 1e9:.2f}B parameters, {nbytes / 2**30:.1f} GiB written in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        outputs = {}
        for _, method, path in [x for x in plan if x[0] == size]:
            dst = work / f"out-{size}-{method}-{path}"
            if dst.exists():
                shutil.rmtree(dst)
            spec = {"src": str(src), "dst": str(dst), "path": path, "step": METHODS[method], "vocab": VOCAB,
                    "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size}
            r = run_child(spec, args.threads, args.timeout)
            blocks = SHAPES[size]["num_hidden_layers"]
            r.update(size=size, parameters=_params(SHAPES[size]), checkpoint_bytes=nbytes, method=method, path=path,
                     blocks=blocks, seconds_per_block=r.get("seconds", float("nan")) / blocks)
            print(f"{size} {method} {path}: {r.get('seconds', float('nan')):.0f} s, peak {r.get('peak_rss_mb', float('nan')):.0f} MiB"
                  + (f" ({r['error']})" if "error" in r else ""), flush=True)
            records.append(r)
            outputs[(method, path)] = dst
        if args.check_equal:
            for method in args.methods:
                a, b = outputs.get((method, "in-memory")), outputs.get((method, "streaming"))
                if a and b and a.exists() and b.exists():
                    same = all(filecmp.cmp(a / n.name, b / n.name, shallow=False) for n in a.iterdir())
                    records.append({"size": size, "method": method, "outputs_identical": same})
        for dst in outputs.values():
            shutil.rmtree(dst, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    smollm2 = _smollm2(args, work) if args.smollm2 else None
    rows = [[r["size"], f"{r['parameters'] / 1e9:.2f}", f"{r['checkpoint_bytes'] / 2**30:.1f}", r["method"], r["path"],
             f"{r.get('peak_rss_mb', float('nan')):.0f}", f"{r.get('seconds', float('nan')):.0f}",
             f"{r['seconds_per_block']:.1f}", r.get("error", "ok")] for r in records if "path" in r]
    table = markdown_table(["model", "params (B)", "bf16 GiB", "method", "path", "peak RSS MiB", "s", "s / block",
                            "outcome"], rows)
    notes = (f"{args.threads} threads; calibration {args.nsamples} x {args.seqlen} random token ids, "
             f"{args.batch_size} windows per forward pass; fp32 "
             "compute (the CLI's). Peak RSS: each child process's own VmHWM at its end (model load, compression and save "
             "included).")
    if not rows:
        table, notes = "", ""
    if smollm2 is not None:
        records.append(smollm2)
        table += ("\n\n" if table else "") + smollm2.pop("table")
        notes += (" " if notes else "") + smollm2["notes"]
    if rows:
        from common import RESULTS_DIR

        plot(records, RESULTS_DIR / f"{args.output}.png")
        table = f"![peak memory and seconds per block vs parameters]({args.output}.png)\n\n" + table
    path = write_results(args.output, title="Streaming vs in-memory compression: peak memory and time vs model size",
                         settings=dict(vars(args)), machine=machine, table=table, records=records, notes=notes)
    print(f"wrote {path}")


def plot(records: list[dict], png: Path) -> None:
    """Peak resident memory (left) and seconds per block (right) against parameters, one line per method and path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, per_block) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = [r for r in records if "path" in r and "peak_rss_mb" in r and r.get("size") != "3B-8L"]
    for method, path in dict.fromkeys((r["method"], r["path"]) for r in runs):
        line = sorted((r for r in runs if (r["method"], r["path"]) == (method, path)), key=lambda r: r["parameters"])
        x = [r["parameters"] / 1e9 for r in line]
        style = {"marker": "o", "linestyle": "-" if path == "streaming" else "--", "label": f"{method} {path}"}
        mem.plot(x, [r["peak_rss_mb"] / 1024 for r in line], **style)
        per_block.plot(x, [r["seconds_per_block"] for r in line], **style)
    mem.axhline(23.4, color="grey", linewidth=0.8)
    mem.text(0.12, 24.5, "this machine's memory", color="grey", fontsize=8)
    for ax, label in ((mem, "peak resident memory (GiB)"), (per_block, "seconds per block")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    mem.legend(fontsize=8)
    fig.suptitle("Streaming vs in-memory compression (2 threads; 3B-8L left out: see the table)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _smollm2(args, work: Path) -> dict:
    """SmolLM2-135M through both paths, alternating, --repeats times each: medians, their ratio, peak memory,
    whether the folders are identical, and both outputs' WikiText-2 perplexity."""
    import statistics

    import torch
    from common import eval_perplexities

    import hf_compress_prompt as hcp
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.models import default_model_path

    src = default_model_path()
    runs = {"in-memory": [], "streaming": []}
    outs = {p: work / f"smollm2-{p}" for p in runs}
    for repeat in range(args.repeats):
        for path in runs:
            if outs[path].exists():
                shutil.rmtree(outs[path])
            spec = {"src": str(src), "dst": str(outs[path]), "path": path, "step": {**METHODS["gptq"]},
                    "real": True, "nsamples": args.real_nsamples, "seqlen": 512}
            r = run_child(spec, args.threads, args.timeout)
            print(f"SmolLM2 gptq {path} #{repeat + 1}: {r.get('seconds', float('nan')):.0f} s, peak "
                  f"{r.get('peak_rss_mb', float('nan')):.0f} MiB" + (f" ({r['error']})" if "error" in r else ""),
                  flush=True)
            runs[path].append(r)
    identical = all(filecmp.cmp(outs["in-memory"] / n.name, outs["streaming"] / n.name, shallow=False)
                    for n in outs["in-memory"].iterdir())
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = {"wikitext2": eval_tokens("wikitext2", tokenizer, "test")}
    ppl = {p: eval_perplexities(hcp.from_pretrained(outs[p]), ids, args.windows)["wikitext2"] for p in runs}
    med = {p: statistics.median(r["seconds"] for r in runs[p]) for p in runs}
    peak = {p: max(r["peak_rss_mb"] for r in runs[p]) for p in runs}
    rows = [[p, " / ".join(f"{r['seconds']:.0f}" for r in runs[p]), f"{med[p]:.0f}", f"{peak[p]:.0f}",
             f"{ppl[p]:.3f}"] for p in runs]
    table = ("SmolLM2-135M-Instruct, GPTQ 4-bit g64 (act-order), C4 calibration:\n\n"
             + markdown_table(["path", "seconds (each run)", "median s", "peak RSS MiB", "WikiText-2 ppl"], rows)
             + f"\n\nstreaming / in-memory time: **{med['streaming'] / med['in-memory']:.2f}x** (medians); "
               f"folders byte-identical: **{identical}**")
    notes = (f"SmolLM2: {args.repeats} runs per path, alternating, {args.threads} threads, {args.real_nsamples} C4 "
             f"windows x 512 tokens, fp32; perplexity on the first {args.windows} WikiText-2 windows of 2048 "
             f"({precision_label()}).")
    for p in outs.values():
        shutil.rmtree(p, ignore_errors=True)
    return {"model": "SmolLM2-135M-Instruct", "runs": runs, "median_seconds": med, "ratio": med["streaming"] / med["in-memory"],
            "peak_rss_mb": peak, "wikitext2": ppl, "identical": identical, "table": table, "notes": notes}


if __name__ == "__main__":
    main()
