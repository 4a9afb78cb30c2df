"""The attention of one recovery training step, alone: forward and backward of causal grouped-query attention at
SmolLM2-135M-Instruct's shapes (9 query heads, 3 key/value heads, head size 64, 30 layers) over 1024 text + 100
prompt positions, through each way torch and transformers can compute it on a CPU, against the step's matmul limit.
Writes docs/results/<output>.{md,json}.

Why: after the chunked loss and bf16 frozen weights (recovery_step.md) a step's matrix products run at this CPU's
measured bf16 matmul peak and attention is the other large share of the step; this bench says whether another
attention path is faster (recover() runs transformers' "sdpa" attention: torch's fused flash kernel on a CPU).

Each variant runs forward + backward (random output gradient) on the same random bf16 inputs; rounds alternate the
variants, each round times --reps calls, each cell is the median of --repeats rounds; x layers gives a step's
attention seconds. Error: relative Frobenius distance of the output and of the query gradient to a float64
reference. Useful GFLOP: the causal half of the products a step needs (forward Q K^T and P V, backward four products),
6 x heads x positions^2 x head size per layer.

    python bench/attention_step.py                     # the reported run
    python bench/attention_step.py --reps 1 --repeats 1   # a smoke run
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from common import bench_parser, markdown_table, matmul_gflops, start_bench, write_results
from torch.nn.attention import SDPBackend, sdpa_kernel


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv, T, D) -> (B, kv * groups, T, D): each key/value head serves ``groups`` query heads."""
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            groups = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, _expand(k, groups), _expand(v, groups), is_causal=True)
    return run


def _explicit(softmax_dtype):
    """Two matmuls and a masked softmax (transformers' "eager" attention takes its softmax in float32)."""
    def run(q, k, v):
        groups, t = q.shape[1] // k.shape[1], q.shape[2]
        scores = (q @ _expand(k, groups).transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        probs = torch.softmax(scores.to(softmax_dtype), dim=-1).to(q.dtype)
        return probs @ _expand(v, groups)
    return run


VARIANTS = {  # name -> (attention(q, k, v), input dtype)
    "SDPA flash (recover()'s path)": (_sdpa(SDPBackend.FLASH_ATTENTION), torch.bfloat16),
    "SDPA math": (_sdpa(SDPBackend.MATH), torch.bfloat16),
    "explicit, fp32 softmax (eager)": (_explicit(torch.float32), torch.bfloat16),
    "explicit, bf16 softmax": (_explicit(torch.bfloat16), torch.bfloat16),
    "SDPA flash in fp32": (_sdpa(SDPBackend.FLASH_ATTENTION), torch.float32),
}


def _fwd_bwd(fn, q, k, v, grad):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return out.detach(), q.grad


def _relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--positions", type=int, default=1124, help="text + prompt positions (default 1024 + 100)")
    parser.add_argument("--reps", type=int, default=5, help="calls timed per round")
    parser.add_argument("--repeats", type=int, default=7, help="rounds (variants alternate within each)")
    parser.add_argument("--output", default="attention_step")
    args, machine = start_bench(parser, argv)

    gen = torch.Generator().manual_seed(0)
    shape_q, shape_kv = (1, args.heads, args.positions, args.head_dim), (1, args.kv_heads, args.positions, args.head_dim)
    q, k, v, grad = (torch.randn(s, generator=gen) for s in (shape_q, shape_kv, shape_kv, shape_q))
    q, k, v, grad = (x.to(torch.bfloat16) for x in (q, k, v, grad))  # every variant sees the same bf16 numbers
    ref_out, ref_grad = _fwd_bwd(_explicit(torch.float64), q.double(), k.double(), v.double(), grad.double())
    errors = {}
    for name, (fn, dtype) in VARIANTS.items():
        out, gq = _fwd_bwd(fn, q.to(dtype), k.to(dtype), v.to(dtype), grad)
        errors[name] = (_relative(out, ref_out), _relative(gq, ref_grad))
    seconds = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (fn, dtype) in VARIANTS.items():
            inputs = [x.to(dtype) for x in (q, k, v)]
            start = time.perf_counter()
            for _ in range(args.reps):
                _fwd_bwd(fn, *inputs, grad)
            seconds[name].append((time.perf_counter() - start) / args.reps)
    peak = {d: matmul_gflops(getattr(torch, d), (2048, 2048, 2048)) for d in ("bfloat16", "float32")}
    useful = 6 * args.heads * args.positions ** 2 * args.head_dim / 1e9  # GFLOP per layer, causal half

    fastest = min(statistics.median(s) for s in seconds.values())
    rows, records = [], []
    for name, (_, dtype) in VARIANTS.items():
        med = statistics.median(seconds[name])
        rate = useful / med
        peak_of = peak[str(dtype).removeprefix("torch.")]
        rows.append([name, str(dtype).removeprefix("torch."), f"{med * 1e3:.1f}", f"{med * args.layers:.2f}",
                     f"{med / fastest:.2f}x", f"{rate:.0f}", f"{rate / peak_of:.0%}",
                     f"{errors[name][0]:.4f}", f"{errors[name][1]:.4f}"])
        records.append({"variant": name, "dtype": str(dtype), "ms_per_layer": med * 1e3,
                        "s_per_step": med * args.layers, "rounds_ms": [s * 1e3 for s in seconds[name]],
                        "useful_gflops": rate, "of_matmul_peak": rate / peak_of,
                        "output_error": errors[name][0], "query_grad_error": errors[name][1]})
    header = ["variant", "dtype", "ms / layer (fwd + bwd)", f"s / step (x{args.layers})", "vs fastest",
              "useful GFLOP/s", "of matmul peak", "output error", "query-gradient error"]
    notes = (f"Medians of {args.repeats} rounds of {args.reps} calls each, variants alternating within a round, "
             f"{args.threads} threads; shapes: batch 1, {args.heads} query heads, {args.kv_heads} key/value heads, "
             f"head size {args.head_dim}, {args.positions} positions, causal. Useful work per layer: {useful:.2f} "
             f"GFLOP. Measured matmul peak (2048^3, median of 7): bf16 {peak['bfloat16']:.0f}, fp32 "
             f"{peak['float32']:.0f} GFLOP/s. Errors: relative to a float64 computation from the same bf16 inputs.")
    settings = {k: v for k, v in vars(args).items()}
    path = write_results(args.output, title="The attention of a recovery step: each CPU path, forward + backward",
                         settings={**settings, "matmul_peak_gflops": peak}, machine=machine,
                         table=markdown_table(header, rows), records=records, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
