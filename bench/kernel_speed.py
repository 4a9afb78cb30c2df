"""Linear-layer kernels on this CPU: our int4 kernel against fp32 / bf16 ``F.linear`` and torch's own int4 op,
all measured in the same run. Writes docs/results/kernels_<threads>t.{md,json}.
(Named kernel_speed.py, not kernels.py: a script's folder comes first on sys.path, and a bench/kernels.py would
stand in for the `kernels` package that transformers imports when it is installed.)

Weights are cold: each implementation cycles through a pool of distinct weight copies larger than the caches
(--pool-mb), so every call streams its weights from memory. Each cell is the best and the median of --reps calls.
The bandwidth limit is the best read rate in the same run: a plain streaming read of cold buffers, MKL's fp32 GEMV on
4096 x 4096, or any shape's cold fp32 row; effective GB/s = weight bytes of the implementation's format / time.

    python bench/kernel_speed.py --threads 1
    python bench/kernel_speed.py --threads 2 --shapes 4096x4096g128
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from common import any_of, bench_parser, markdown_table, start_bench, write_results

from hf_compress_prompt.formats import LinearFormat, pack_linear
from hf_compress_prompt.kernels import cpu
from hf_compress_prompt.methods.masks import nm_prune_mask

SHAPES = {  # name -> (out, in, group size)
    "4096x4096g128": (4096, 4096, 128),
    "smollm2 q/o 576x576g64": (576, 576, 64),
    "smollm2 k/v 192x576g64": (192, 576, 64),
    "smollm2 gate/up 1536x576g64": (1536, 576, 64),
    "smollm2 down 576x1536g64": (576, 1536, 64),
    "smollm2 lm_head-size 49152x576g64": (49152, 576, 64),
}


OURS_INT4 = "ours int4 (C, W4A8, 16-row tiles)"


def _time(fn, pool, reps: int) -> tuple[float, float]:
    for item in pool[: min(2, len(pool))]:
        fn(item)  # warm-up (allocations, first-call set-up)
    times = []
    for r in range(reps):
        item = pool[r % len(pool)]
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def _pool(make, nbytes: int, pool_bytes: int, limit: int = 4096) -> list:
    count = max(2, min(limit, -(-pool_bytes // max(nbytes, 1))))
    return [make(i) for i in range(count)]


def run_shape(name: str, out: int, inp: int, gs: int, token_counts: list[int], args) -> list[dict]:
    """Every implementation on one shape: each pool is built once and timed at every token count."""
    torch.manual_seed(0)
    pool_bytes = args.pool_mb * 2**20
    xs = {t: (torch.randn(t, inp), torch.randn(t, inp).bfloat16()) for t in token_counts}
    x32 = xbf = None  # set per token count below; the lambdas read them at call time
    groups = inp // gs
    fmt = LinearFormat(inp, out, bits=4, group_size=gs)

    def ours(i):
        codes = torch.randint(0, 16, (out, inp), dtype=torch.uint8)
        scale, zero = torch.rand(out, groups) * 0.01, torch.randint(0, 16, (out, groups)).float()
        tensors = pack_linear(fmt, torch.empty(out, inp, device="meta"), codes=codes, scale=scale.bfloat16(), zero=zero)
        cpu.prepare(fmt, tensors)  # the load-time repack into 16-row tiles, outside the timing
        return fmt, tensors

    def ours_sparse_int4(pattern):
        def make(i):
            if pattern == "2:4":
                pruned = nm_prune_mask(torch.rand(out, inp), 2, 4)
                sfmt = LinearFormat(inp, out, bits=4, group_size=gs, sparsity="2:4")
            else:
                pruned = torch.rand(out, inp) < 0.5
                sfmt = LinearFormat(inp, out, bits=4, group_size=gs, sparsity="bitmask", nnz=int((~pruned).sum()))
            codes = torch.randint(0, 16, (out, inp), dtype=torch.uint8)
            scale, zero = torch.rand(out, groups) * 0.01, torch.randint(0, 16, (out, groups)).float()
            tensors = pack_linear(sfmt, torch.empty(out, inp), codes=codes, scale=scale.bfloat16(), zero=zero,
                                  pruned=pruned)
            cpu.prepare(sfmt, tensors)  # the load-time repack, outside the timing
            return sfmt, tensors
        return make

    def ours_sparse_bf16(i):
        pruned = torch.rand(out, inp) < 0.5
        sfmt = LinearFormat(inp, out, sparsity="bitmask", nnz=int((~pruned).sum()))
        tensors = pack_linear(sfmt, torch.randn(out, inp).bfloat16().masked_fill(pruned, 0), pruned=pruned)
        cpu.prepare(sfmt, tensors)
        return sfmt, tensors

    def torch_int4(i):
        q = torch.randint(0, 16, (out, inp), dtype=torch.int32)
        sz = torch.stack([torch.rand(groups, out) * 0.01, torch.rand(groups, out)], -1).bfloat16()  # (G, out, 2)
        return torch._convert_weight_to_int4pack_for_cpu(q, 1), sz

    impls = {
        "fp32 F.linear": (lambda i: torch.randn(out, inp), lambda w: F.linear(x32, w), out * inp * 4),
        "bf16 F.linear": (lambda i: torch.randn(out, inp).bfloat16(), lambda w: F.linear(xbf, w), out * inp * 2),
        "torch int4 (_weight_int4pack_mm_for_cpu)": (
            torch_int4, lambda w: torch._weight_int4pack_mm_for_cpu(xbf, w[0], gs, w[1]), out * inp // 2 + groups * out * 4),
    }
    if cpu.available():
        # bytes each kernel reads: its load-time layout (codes, masks, offsets, fp32 scales, uint8 zero points)
        impls[OURS_INT4] = (ours, lambda p: cpu.int_linear(xbf, p[0], p[1], None), None)
        impls["ours 50% bitmask + int4 (C, W4A8, tiles)"] = (
            ours_sparse_int4("bitmask"), lambda p: cpu.sparse_linear(xbf, p[0], p[1], None), None)
        impls["ours 2:4 + int4 (C, W4A8, tiles)"] = (
            ours_sparse_int4("2:4"), lambda p: cpu.sparse_linear(xbf, p[0], p[1], None), None)
        impls["ours 50% bitmask, bf16 values (C)"] = (ours_sparse_bf16, lambda p: cpu.sparse_linear(xbf, p[0], p[1], None),
                                                      None)
    records = []
    for impl, (make, call, nbytes) in impls.items():
        if nbytes is None:  # our kernels: the bytes of the layout they read
            nbytes = _layout_bytes(make(-1))
        pool = _pool(make, nbytes, pool_bytes)
        for tokens in token_counts:
            x32, xbf = xs[tokens]
            best, median = _time(lambda item: call(item), pool, args.reps)
            records.append({"shape": name, "out": out, "in": inp, "group_size": gs, "tokens": tokens, "impl": impl,
                            "weight_bytes": nbytes, "pool": len(pool), "best_us": best * 1e6,
                            "median_us": median * 1e6, "best_GBps": nbytes / best / 1e9})
        del pool
    return records


def _layout_bytes(layer) -> int:
    """Bytes of the kernel's load-time layout of a layer (what one call streams from memory)."""
    plan = cpu.prepare(*layer)
    return sum(t.numel() * t.element_size() for t in plan.tensors if t is not None)


def bandwidth_limit(args) -> dict[str, float]:
    """Attainable read bandwidth (GB/s), measured two ways on cold 64 MB buffers: a plain streaming read (an int64
    sum over the buffer, which does one add per 8 bytes: far below what a core can add, so memory bounds it) and
    MKL's fp32 GEMV on 4096 x 4096 (the weight-streaming op every dense layer runs)."""
    pool = _pool(lambda i: torch.randn(4096, 4096), 4096 * 4096 * 4, args.pool_mb * 2**20)
    x = torch.randn(1, 4096)
    reps = max(args.reps, 15)
    read, _ = _time(lambda w: w.view(torch.int64).sum(), pool, reps)
    gemv, _ = _time(lambda w: F.linear(x, w), pool, reps)
    return {"streaming_read": 4096 * 4096 * 4 / read / 1e9, "fp32_gemv": 4096 * 4096 * 4 / gemv / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, threads=1)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help=any_of(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--pool-mb", type=int, default=256, help="weight bytes each implementation cycles through")
    parser.add_argument("--name", default=None, help="results stem (default kernels_<threads>t)")
    args, machine = start_bench(parser, argv)
    measured = bandwidth_limit(args)
    print(f"read bandwidth, cold: streaming read {measured['streaming_read']:.1f} GB/s, fp32 GEMV 4096x4096 "
          f"{measured['fp32_gemv']:.1f} GB/s", flush=True)
    records = []
    for name in args.shapes:
        out, inp, gs = SHAPES[name]
        rows = run_shape(name, out, inp, gs, args.tokens, args)
        records += rows
        for r in rows:
            print(f"{name} T={r['tokens']} {r['impl']}: best {r['best_us']:.0f} us, median {r['median_us']:.0f} us",
                  flush=True)
    records.sort(key=lambda r: (args.shapes.index(r["shape"]), r["tokens"]))
    fp32_gemv = [r["best_GBps"] for r in records if r["impl"] == "fp32 F.linear" and r["tokens"] == 1
                 and r["pool"] * r["weight_bytes"] >= args.pool_mb * 2**20 * 0.9]  # only truly cold pools
    limit = max([*measured.values(), *fp32_gemv])  # the best read rate seen in this run is the attainable one
    header = ["shape", "tokens", "implementation", "best us", "median us", "GB/s", "% of limit", "vs bf16 F.linear",
              "vs torch int4", "vs ours dense int4"]
    rows = []
    for r in records:
        same = {x["impl"]: x for x in records if x["shape"] == r["shape"] and x["tokens"] == r["tokens"]}
        bf16, tint4 = same["bf16 F.linear"], same["torch int4 (_weight_int4pack_mm_for_cpu)"]
        mine = same.get(OURS_INT4)
        rows.append([r["shape"], r["tokens"], r["impl"], f"{r['best_us']:.0f}", f"{r['median_us']:.0f}",
                     f"{r['best_GBps']:.1f}", f"{100 * r['best_GBps'] / limit:.0f}%",
                     f"{bf16['best_us'] / r['best_us']:.2f}x", f"{tint4['best_us'] / r['best_us']:.2f}x",
                     f"{mine['best_us'] / r['best_us']:.2f}x" if mine else "-"])
    notes = (
        f"Bandwidth limit measured in this run: **{limit:.1f} GB/s**, the best of: a plain streaming read of cold "
        f"64 MB buffers ({measured['streaming_read']:.1f} GB/s; an int64 sum), MKL's fp32 GEMV on cold 4096 x 4096 "
        f"({measured['fp32_gemv']:.1f} GB/s) and every shape's cold fp32 row. {args.threads} thread(s); best and "
        f"median of {args.reps} calls, each on the next of a pool of "
        f"distinct weights totalling about {args.pool_mb} MB per implementation (cold weights). 'vs' columns: speed-up "
        "of this row over that implementation (best times). Our kernel takes bf16 activations, quantizes them to int8 "
        "per 64 inputs (W4A8, as llama.cpp's Q4 x Q8) and computes in int32/fp32; torch's int4 op takes bf16 "
        "activations. Weight bytes: what each implementation streams per call; for ours, the load-time layout (16-row "
        "tiles of int4 codes, fp32 scales and uint8 zero points per tile and group; sparse: the kept codes, taking "
        "max(kept low, kept high) bytes per 128-weight chunk, plus one mask bit per weight)."
    )
    settings = {"threads": args.threads, "reps": args.reps, "pool_mb": args.pool_mb, "tokens": args.tokens,
                "shapes": args.shapes, "cpu_kernels": [cpu.kernel_name("int"), cpu.kernel_name("bitmask"),
                                                       cpu.kernel_name("bitmask", None)] if cpu.available()
                else cpu.unavailable_reason(), "bandwidth_limit_GBps": limit,
                "read_bandwidth_GBps": measured}
    path = write_results(args.name or f"kernels_{args.threads}t", title=f"Linear kernels, {args.threads} thread(s)",
                         settings=settings, machine=machine, table=markdown_table(header, rows), records=records,
                         notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
