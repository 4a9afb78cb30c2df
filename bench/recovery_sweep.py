"""How the soft prompt's learning rate, step budget and loss decide what it recovers, on one compressed SmolLM2
model; the same for the deep prompt (prefix, with or without PEFT's reparametrising projection). Writes
docs/results/recovery_sweep.{md,json} (or --output).

The model is compressed once (default: the issue's setting (a), SparseGPT 50% + 4-bit g64, weights kept dense and
fake-quantized); then one prompt per learning rate and loss is trained from the same initialisation on the same C4
windows, and WikiText-2 / PTB perplexity is measured with each. Every prompt sees the same data in the same order
(seed 0). Losses: `lm` (the paper's: the corpus' next tokens) and `distill` (KL to the uncompressed model's
next-token distributions, :mod:`hf_compress_prompt.recovery.distill`; one more forward pass per step).

    python bench/recovery_sweep.py                                  # the run reported in docs/results
    python bench/recovery_sweep.py --methods PREFIX PREFIX_PROJECTION --lrs 3e-3 1e-2 3e-2 --steps 64 \
        --seqlen 1024 --batch 1 --eval-steps 16 --windows 8 --output recovery_sweep_prefix   # the prefix's sweep
    python bench/recovery_sweep.py --lrs 1e-3 3e-2 --steps 4 --windows 1   # a smoke run
"""

from __future__ import annotations

import copy
import itertools
import time

from common import bench_parser, eval_perplexities, markdown_table, precision_label, start_bench, write_results
from recovery import SETTINGS

from hf_compress_prompt.compressors import CalibrationConfig, Recipe, compress_
from hf_compress_prompt.recovery import detach_recovery_prompt
from hf_compress_prompt.recovery.train import PromptInit, RecoveryConfig, recover
from hf_compress_prompt.recovery.transfer import gap_closed

DATASETS = ("wikitext2", "ptb")
# what each --methods name trains: RecoveryConfig fields
METHODS = {
    "PROMPT": {"method": "PROMPT"},
    "PREFIX": {"method": "PREFIX", "prefix_projection": False},
    "PREFIX_PROJECTION": {"method": "PREFIX", "prefix_projection": True},
}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = bench_parser(__doc__, threads=2, precision=True)
    parser.add_argument("--setting", default="sparsegpt-50%+w4-g64", choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=["PROMPT"], choices=list(METHODS),
                        help="adapters to sweep: the prompt, the prefix (deep prompt), the prefix trained through "
                             "PEFT's projection MLP")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 / PTB test windows of 2048 tokens")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--losses", nargs="+", default=["lm"], choices=["lm", "distill"],
                        help="training losses to compare (distill: KL to the dense model)")
    parser.add_argument("--inits", nargs="+", default=["VOCAB"], choices=[i.value for i in PromptInit],
                        help="prompt initialisations to compare (VOCAB: the first n vocabulary embeddings, the paper's)")
    parser.add_argument("--init-text", default="The following is a passage of well-written English text:",
                        help="the text whose token embeddings start a TEXT prompt (repeated to length)")
    parser.add_argument("--output", default="recovery_sweep", help="results name under docs/results")
    args, machine = start_bench(parser, argv)
    start_all = time.perf_counter()

    def ppl(model) -> dict[str, float]:
        return eval_perplexities(model, ids, args.windows)

    model, tokenizer = load_model_and_tokenizer()
    ids = {d: eval_tokens(d, tokenizer, "test") for d in DATASETS}
    dense = ppl(model)
    teacher = copy.deepcopy(model).eval() if "distill" in args.losses else None
    compress_(model, Recipe(SETTINGS[args.setting], CalibrationConfig(nsamples=args.nsamples)), tokenizer=tokenizer,
              pack=False, progress=False)
    compressed = ppl(model)
    _log(f"dense {dense}, {args.setting} {compressed}")
    records = []
    for method, lr, loss, init in itertools.product(args.methods, args.lrs, args.losses, args.inits):
        config = RecoveryConfig(num_virtual_tokens=args.tokens, seqlen=args.seqlen, max_steps=args.steps,
                                batch_size=args.batch, eval_steps=args.eval_steps, eval_windows=args.eval_windows,
                                learning_rate=lr, init=PromptInit(init), bf16=args.bf16,
                                init_text=args.init_text if init == "TEXT" else None, **METHODS[method])
        result = recover(model, tokenizer, config, teacher=teacher if loss == "distill" else None)
        recovered = ppl(model)
        detach_recovery_prompt(model)
        record = {"method": method, "learning_rate": lr, "loss": loss, "init": init, "recovered": recovered,
                  "best_step": result.best_step,
                  "best_c4_validation_perplexity": result.best_perplexity, "history": result.history,
                  "seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
                  "gap_closed": {d: gap_closed(dense[d], compressed[d], recovered[d]) for d in DATASETS}}
        records.append(record)
        _log(f"{method}, lr {lr:g}, loss {loss}, init {init}: {recovered} (best C4 valid "
             f"{result.best_perplexity:.2f} at step "
             f"{result.best_step}, {result.seconds:.0f} s)")

    rows = []
    for r in records:
        curve = ", ".join(f"{h['step']}: {h['perplexity']:.1f}" for h in r["history"])
        rows.append([r["method"], f"{r['learning_rate']:g}", r["loss"], r["init"], curve, r["best_step"]]
                    + [f"{r['recovered'][d]:.2f} ({100 * r['gap_closed'][d]:.0f}%)" for d in DATASETS]
                    + [f"{r['seconds_per_step']:.1f}"])
    table = markdown_table(["method", "learning rate", "loss", "init", "C4 validation ppl by step", "best step"]
                           + [f"{d} recovered (gap closed)" for d in DATASETS] + ["s / step"], rows)
    total = time.perf_counter() - start_all
    notes = (f"Setting {args.setting}: dense " + ", ".join(f"{d} {dense[d]:.2f}" for d in DATASETS)
             + "; compressed " + ", ".join(f"{d} {compressed[d]:.2f}" for d in DATASETS)
             + f". Perplexity on the first {args.windows} windows of 2048 tokens ({precision_label()}). Prompts: "
             f"{args.tokens} virtual tokens (init VOCAB: the first {args.tokens} vocabulary embeddings; TEXT: the "
             f"embeddings of {args.init_text!r}'s tokens, repeated; SAMPLE_VOCAB: random vocabulary entries, "
             "seed 0; RANDOM: PEFT's); a prefix (PREFIX) holds that many key/value pairs in every layer, started as "
             "the keys and values of the initial prompt (PREFIX_PROJECTION: trained through PEFT's MLP, its last "
             "layer solved so that it starts at the same prefix); AdamW (weight decay "
             f"1e-5), {args.steps} steps x {args.batch} x {args.seqlen} C4 tokens, 10% warm-up then linear decay, "
             f"clipping 1.0, best of the validations every {args.eval_steps} steps on {args.eval_windows} held-out "
             f"C4 windows kept; loss lm = the corpus' next tokens, distill = KL to the dense model's next-token "
             f"distributions (validation is C4 perplexity either way); {args.threads} threads. "
             f"Whole run: {total / 60:.1f} min.")
    settings = dict(vars(args))
    path = write_results(args.output, title=f"Prompt training sweep on {args.setting}", settings=settings,
                         machine=machine, table=table,
                         records=[{"dense": dense, "compressed": compressed}, *records], notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
