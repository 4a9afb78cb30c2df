"""GPTQ's solver alone (``methods.gptq.gptq_quantize``: the column loop, after the Hessian is gathered) on the
linear shapes of SmolLM2-135M and of the streaming bench's 0.5B and 3B models, in this checkout and, with
--against DIR, in another checkout of the package, alternating, with the codes of both compared. Writes
docs/results/<output>.{md,json}.

Each (checkout, shape, order) runs in a fresh child process: a random weight and a Hessian from random inputs with
spread channel scales (seeded: both checkouts solve the same problem), --reps solves timed, their median kept;
children alternate A, B, A, B over --repeats rounds and each cell is the median of its rounds.

    python bench/gptq_solver.py --against /tmp/hcp-before      # the reported run (a worktree of the old commit)
    python bench/gptq_solver.py --shapes smollm2-down --reps 1 --repeats 1   # a smoke run
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import any_of, bench_parser, markdown_table, start_bench, write_results

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> (out_features, in_features): the weight GPTQ walks column by column
    "smollm2-qkvo": (576, 576),
    "smollm2-gate-up": (1536, 576),
    "smollm2-down": (576, 1536),
    "0.5B-q": (1280, 1280),
    "0.5B-down": (1280, 3456),
    "3B-gate-up": (8640, 3200),
    "3B-down": (3200, 8640),
}
ORDERS = {"act-order": True, "in order": False}

CHILD = r"""
import hashlib, json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from hf_compress_prompt.methods.gptq import gptq_quantize
torch.set_num_threads(int(sys.argv[2]))
rows, cols, act_order, reps = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6])
g = torch.Generator().manual_seed(0)
W = torch.randn(rows, cols, generator=g) * 0.02
X = torch.randn(2048, cols, generator=g) * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
H = 2 * X.T @ X / X.shape[0]
times = []
for _ in range(reps):
    start = time.perf_counter()
    qw = gptq_quantize(W, H, 4, 64, act_order=act_order)
    times.append(time.perf_counter() - start)
import hf_compress_prompt.methods.gptq as m
digest = hashlib.sha256(qw.codes.numpy().tobytes() + qw.scale.numpy().tobytes() + qw.zero.numpy().tobytes())
print(json.dumps({"seconds": statistics.median(times), "sha256": digest.hexdigest(), "module": m.__file__}))
"""


def _solve(root: Path, threads: int, shape: tuple[int, int], act_order: bool, reps: int, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(threads), str(shape[0]), str(shape[1]),
                           "1" if act_order else "0", str(reps)], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the solve in {root} failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help=any_of(SHAPES))
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS))
    parser.add_argument("--against", default=None, metavar="DIR",
                        help="another checkout of the package (e.g. a git worktree of an older commit) to time too")
    parser.add_argument("--reps", type=int, default=3, help="solves per child process (median kept)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of child processes")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    parser.add_argument("--output", default="gptq_solver", help="results name under docs/results")
    args, machine = start_bench(parser, argv)
    checkouts = {"this": ROOT} | ({"against": Path(args.against).resolve()} if args.against else {})
    records = []
    for shape in args.shapes:
        for order in args.orders:
            runs = {label: [] for label in checkouts}
            for _ in range(args.repeats):
                for label, root in checkouts.items():
                    runs[label].append(_solve(root, args.threads, SHAPES[shape], ORDERS[order], args.reps,
                                              args.timeout))
            record = {"shape": shape, "out_features": SHAPES[shape][0], "in_features": SHAPES[shape][1],
                      "order": order}
            for label, got in runs.items():
                record[f"{label}_s"] = statistics.median(r["seconds"] for r in got)
                record[f"{label}_rounds_s"] = [r["seconds"] for r in got]
                record[f"{label}_sha256"] = got[0]["sha256"]
                record[f"{label}_module"] = got[0]["module"]
            if args.against:
                record["speedup"] = record["against_s"] / record["this_s"]
                record["same_codes"] = record["this_sha256"] == record["against_sha256"]
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if not k.endswith(("_module", "_sha256"))}),
                  flush=True)
    header = ["shape", "out x in", "order", "this checkout s"]
    if args.against:
        header += ["other checkout s", "speed-up", "same codes and grids"]
    rows = []
    for r in records:
        row = [r["shape"], f"{r['out_features']} x {r['in_features']}", r["order"], f"{r['this_s']:.3f}"]
        if args.against:
            row += [f"{r['against_s']:.3f}", f"{r['speedup']:.2f}x", "yes" if r["same_codes"] else "**no**"]
        rows.append(row)
    against = f" against `{args.against}`" if args.against else ""
    notes = (f"4-bit, groups of 64, damp 0.01, blocks of 128 columns; {args.threads} thread(s). Each cell is the "
             f"median over {args.repeats} alternating child processes of the median of {args.reps} solves{against}. "
             "Same codes: SHA-256 of the codes, scales and zero points of both checkouts' solves of the same seeded "
             "problem.")
    settings = {"threads": args.threads, "shapes": args.shapes, "orders": args.orders, "reps": args.reps,
                "repeats": args.repeats, "against": args.against, "bits": 4, "group_size": 64}
    path = write_results(args.output, title="GPTQ's column solver", settings=settings, machine=machine,
                         table=markdown_table(header, rows), records=records, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
