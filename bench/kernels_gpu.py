"""Linear-layer kernels on a CUDA GPU: our Triton int4 kernels (dense, 2:4 + int4, 50% bitmask + int4) against
bf16 ``F.linear`` and torch's own int4 op (``_weight_int4pack_mm``, the tinygemm kernel), all in the same run.
Writes docs/results/<name>.{md,json} (default kernels_gpu). Refuses in one line on a machine without a GPU.

Weights are cold: each implementation cycles through a pool of distinct weight copies larger than the GPU's L2
cache (--pool-mb), so every call reads its weights from HBM. Each cell is the best and the median of --reps calls
timed with CUDA events. Each of our kernels is also checked against the exact reference op on the same weights
(max error relative to the output's largest value). torch ships no Marlin-style kernel of its own (Marlin lives in
vLLM and torchao); the run says which of the op names it looked for exist in the installed torch.

    python bench/kernels_gpu.py
    python bench/kernels_gpu.py --shapes 4096x4096g128 --tokens 1 16 128
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from common import any_of, bench_parser, markdown_table, start_bench, write_results

from hf_compress_prompt.formats import LinearFormat, pack_linear
from hf_compress_prompt.kernels import triton as tk
from hf_compress_prompt.kernels.reference import reference_linear
from hf_compress_prompt.methods.masks import layer_prune_mask, nm_prune_mask

SHAPES = {  # name -> (out, in, group size)
    "4096x4096g128": (4096, 4096, 128),
    "smollm2 q/o 576x576g64": (576, 576, 64),
    "smollm2 gate/up 1536x576g64": (1536, 576, 64),
    "smollm2 down 576x1536g64": (576, 1536, 64),
    "smollm2 lm_head-size 49152x576g64": (49152, 576, 64),
}
MARLIN_NAMES = ("marlin_gemm", "_marlin_gemm", "gptq_marlin_gemm", "marlin_24_gemm")  # looked up in torch.ops.aten
BF16 = "bf16 F.linear"
TORCH_INT4 = "torch int4 (_weight_int4pack_mm)"


def _time(fn, pool, reps: int) -> tuple[float, float]:
    """Best and median seconds of ``fn(item)`` over ``reps`` calls, each on the next item of ``pool``."""
    for item in pool[: min(2, len(pool))]:
        fn(item)  # warm-up: compilation, autotuning, allocations
    torch.cuda.synchronize()
    times = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(pool[r % len(pool)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times), statistics.median(times)


def _ours(out: int, inp: int, gs: int, sparsity: str | None):
    """A maker of one random packed layer of ours on the GPU: (format, tensors)."""
    groups = inp // gs

    def make(i):
        w = torch.randn(out, inp)
        pruned = None
        if sparsity == "2:4":
            pruned = nm_prune_mask(w.abs(), 2, 4)
        elif sparsity == "bitmask":
            pruned = layer_prune_mask(w.abs(), 0.5)
        fmt = LinearFormat(inp, out, bits=4, group_size=gs, sparsity=sparsity,
                           nnz=int((~pruned).sum()) if sparsity == "bitmask" else None)
        codes = torch.randint(0, 16, (out, inp), dtype=torch.uint8)
        scale, zero = (torch.rand(out, groups) * 0.01).bfloat16(), torch.randint(0, 16, (out, groups)).float()
        tensors = pack_linear(fmt, torch.empty(out, inp), codes=codes, scale=scale, zero=zero, pruned=pruned)
        return fmt, {k: v.cuda() for k, v in tensors.items()}

    return make


def _torch_int4(out: int, inp: int, gs: int, inner_k_tiles: int = 4):
    def make(i):
        q = torch.randint(0, 16, (out, inp), dtype=torch.int32, device="cuda")
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (out, in / 2): two codes a byte, high first
        w = torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)
        sz = torch.stack([torch.rand(inp // gs, out, device="cuda") * 0.01,
                          torch.rand(inp // gs, out, device="cuda")], -1).bfloat16()  # (G, out, 2)
        return w, sz

    return make


def _bytes(item) -> int:
    tensors = item[1] if isinstance(item[1], dict) else {"w": item[0], "sz": item[1]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_shape(name: str, out: int, inp: int, gs: int, token_counts: list[int], args) -> list[dict]:
    torch.manual_seed(0)
    xs = {t: torch.randn(t, inp, device="cuda").bfloat16() for t in token_counts}
    x = None  # set per token count below; the calls read it at call time
    impls = {
        BF16: (lambda i: torch.randn(out, inp, device="cuda").bfloat16(), lambda w: F.linear(x, w)),
        TORCH_INT4: (_torch_int4(out, inp, gs), lambda p: torch.ops.aten._weight_int4pack_mm(x, p[0], gs, p[1])),
        "ours int4 (Triton)": (_ours(out, inp, gs, None), lambda p: tk.int4_linear(x, p[0], p[1], None)),
        "ours 2:4 + int4 (Triton)": (_ours(out, inp, gs, "2:4"), lambda p: tk.sparse_int4_linear(x, p[0], p[1], None)),
        "ours 50% bitmask + int4 (Triton)": (_ours(out, inp, gs, "bitmask"),
                                             lambda p: tk.sparse_int4_linear(x, p[0], p[1], None)),
    }
    records = []
    for impl, (make, call) in impls.items():
        try:
            first = make(-1)
        except (RuntimeError, NotImplementedError) as exc:  # an op this torch or GPU lacks: said, not fatal
            records.append({"shape": name, "impl": impl, "unavailable": str(exc).splitlines()[0][:200]})
            continue
        nbytes = first[0].numel() * first[0].element_size() if isinstance(first, torch.Tensor) else _bytes(first)
        count = max(2, min(512, -(-args.pool_mb * 2**20 // max(nbytes, 1))))
        pool = [first, *(make(i) for i in range(count - 1))]
        for tokens in token_counts:
            x = xs[tokens]
            error = None
            if impl.startswith("ours"):
                exact = reference_linear(x.float(), first[0], first[1], None)
                error = float((call(first).float() - exact).abs().max() / exact.abs().max())
            best, median = _time(call, pool, args.reps)
            records.append({"shape": name, "out": out, "in": inp, "group_size": gs, "tokens": tokens, "impl": impl,
                            "weight_bytes": nbytes, "pool": len(pool), "best_us": best * 1e6,
                            "median_us": median * 1e6, "best_GBps": nbytes / best / 1e9, "max_rel_error": error})
        del pool
        torch.cuda.empty_cache()
    return records


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, threads=1)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help=any_of(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--pool-mb", type=int, default=512, help="weight bytes each implementation cycles through "
                        "(above the GPU's L2 cache: cold weights)")
    parser.add_argument("--name", default="kernels_gpu", help="results stem under docs/results")
    args, machine = start_bench(parser, argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here "
                         "(bench/kernel_speed.py measures the CPU kernels)")
    if tk.unavailable_reason() is not None:
        raise SystemExit(f"bench/kernels_gpu.py: the Triton kernels cannot run here: {tk.unavailable_reason()}")
    machine["gpu"] = torch.cuda.get_device_name(0)
    marlin = [n for n in MARLIN_NAMES if hasattr(torch.ops.aten, n)]
    records = []
    for name in args.shapes:
        records += run_shape(name, *SHAPES[name], args.tokens, args)
    timed = [r for r in records if "best_us" in r]
    for r in timed:
        print(f"{r['shape']} T={r['tokens']} {r['impl']}: best {r['best_us']:.1f} us, median {r['median_us']:.1f} us",
              flush=True)
    header = ["shape", "tokens", "implementation", "best us", "median us", "GB/s", "vs bf16 F.linear",
              "vs torch int4", "max rel. error"]
    rows = []
    for r in sorted(timed, key=lambda r: (args.shapes.index(r["shape"]), r["tokens"])):
        same = {x["impl"]: x for x in timed if x["shape"] == r["shape"] and x["tokens"] == r["tokens"]}
        bf16, tint4 = same.get(BF16), same.get(TORCH_INT4)
        rows.append([r["shape"], r["tokens"], r["impl"], f"{r['best_us']:.1f}", f"{r['median_us']:.1f}",
                     f"{r['best_GBps']:.0f}", f"{bf16['best_us'] / r['best_us']:.2f}x" if bf16 else "-",
                     f"{tint4['best_us'] / r['best_us']:.2f}x" if tint4 else "-",
                     "-" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"])
    missing = [f"{r['shape']} {r['impl']}: {r['unavailable']}" for r in records if "unavailable" in r]
    notes = (
        f"GPU: {machine['gpu']}; torch {torch.__version__}. Best and median of {args.reps} calls (CUDA events), "
        f"each on the next of a pool of distinct weights of about {args.pool_mb} MB per implementation (cold in L2). "
        "bf16 activations everywhere. 'vs' columns: speed-up of this row over that implementation (best times). "
        "Weight bytes: what each implementation's stored layout holds (ours: packed int4 codes, bf16 scales, "
        "zero points, masks or 2:4 indices). max rel. error: our kernel against the exact reference op on the same "
        "weights. Marlin-style ops looked for in torch.ops.aten ("
        + ", ".join(MARLIN_NAMES) + "): " + (", ".join(marlin) if marlin else "none present") + "."
        + ("" if not missing else " Not measured: " + "; ".join(missing) + ".")
    )
    settings = {"reps": args.reps, "pool_mb": args.pool_mb, "tokens": args.tokens, "shapes": args.shapes,
                "marlin_ops_in_torch": marlin}
    path = write_results(args.name, title="Linear kernels on the GPU: Triton int4 / sparse int4 vs bf16 and torch int4",
                         settings=settings, machine=machine, table=markdown_table(header, rows), records=records,
                         notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
