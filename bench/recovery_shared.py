"""One prompt for two compression methods: a prompt trained on (a) SparseGPT 50% + 4-bit g64 and (b) GPTQ 3-bit g64
at once (``recover(a, tok, shared_with=[b])``) against each model's own prompt and the other's (transfer), on
SmolLM2-135M-Instruct. Writes docs/results/recovery_shared.{md,json} (or --output).

bench/recovery.py finds that a prompt trained on one method does not transfer to the other (it repairs sparsity, not
3-bit rounding error: transfer_components.md). The shared prompt is the practical answer when one prompt has to serve
both: it costs two forward and backward passes per step, so at --steps it has the compute of the two own prompts
together. --held-out adds compressions no prompt was trained on (the two halves of (a)'s recipe by default), where
every prompt is a transferred one.

    python bench/recovery_shared.py                    # the run reported in docs/results/recovery_shared.md
    python bench/recovery_shared.py --steps 4 --windows 1 --nsamples 4 --held-out   # a smoke run
"""

from __future__ import annotations

import time

from common import (
    add_prompt_recipe_args,
    any_of,
    bench_bf16,
    bench_parser,
    eval_perplexities,
    markdown_table,
    precision_label,
    preset_settings,
    prompt_recipe,
    start_bench,
    write_results,
)

from hf_compress_prompt.compressors import CalibrationConfig, Recipe, compress_
from hf_compress_prompt.recovery.train import recover
from hf_compress_prompt.recovery.transfer import evaluate_transfer, gap_closed

TRAINED_ON = preset_settings({name: name for name in ("sparsegpt-50%+w4-g64", "gptq-w3-g64")})  # recovery.py's (a), (b)
HELD_OUT = preset_settings({name: name for name in ("sparsegpt-50%", "gptq-w4-g64", "sparsegpt-60%+w4-g64")})
DATASETS = ("wikitext2", "ptb")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _cell(value: float, dense: float, without: float) -> str:
    return f"{value:.2f} ({100 * gap_closed(dense, without, value):.0f}%)"


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = bench_parser(__doc__, threads=2, precision=True)
    add_prompt_recipe_args(parser, steps=64, eval_steps=16)
    parser.add_argument("--held-out", nargs="*", default=["sparsegpt-50%", "gptq-w4-g64"], choices=list(HELD_OUT),
                        metavar="NAME", help=f"compressions no prompt was trained on: {any_of(HELD_OUT)}; none if "
                        "given without names (default: sparsegpt-50%% gptq-w4-g64)")
    parser.add_argument("--output", default="recovery_shared", help="results name under docs/results")
    args, machine = start_bench(parser, argv)
    start_all = time.perf_counter()
    config = prompt_recipe(args)

    model, tokenizer = load_model_and_tokenizer()
    ids = {d: eval_tokens(d, tokenizer, "test") for d in DATASETS}
    dense = eval_perplexities(model, ids, args.windows)
    del model
    _log(f"dense: {dense}")

    def compressed(name: str, recipe):
        model, _ = load_model_and_tokenizer()
        start = time.perf_counter()
        compress_(model, Recipe(recipe, CalibrationConfig(nsamples=args.nsamples)), tokenizer=tokenizer, pack=False,
                  progress=False)
        _log(f"{name}: compressed in {time.perf_counter() - start:.0f} s")
        return model

    models = {name: compressed(name, recipe) for name, recipe in TRAINED_ON.items()}
    a, b = TRAINED_ON
    results = {}
    for name in (a, b):
        results[f"{name} prompt"] = recover(models[name], tokenizer, config, attach=False)
    results["shared prompt"] = recover(models[a], tokenizer, config, shared_with=[models[b]], attach=False)
    training = {}
    for label, r in results.items():
        training[label] = {"seconds": r.seconds, "seconds_per_step": r.seconds_per_step, "best_step": r.best_step,
                           "best_c4_validation_perplexity": r.best_perplexity}
        _log(f"{label}: {training[label]}")
    for name in args.held_out:
        models[name] = compressed(name, HELD_OUT[name])
    prompts = {label: r.prompt for label, r in results.items()}
    matrix = evaluate_transfer(prompts, models, ids, dense=dense, max_windows=args.windows, autocast_bf16=bench_bf16())

    rows, records = [], []
    for name in models:
        for d in DATASETS:
            without = matrix.without[(name, d)]
            values = {label: matrix.with_prompt[(label, name, d)] for label in prompts}
            own = values.get(f"{name} prompt")
            kept = None if own is None or without <= own else (without - values["shared prompt"]) / (without - own)
            records.append({"target": name, "held_out": name not in TRAINED_ON, "dataset": d, "dense": dense[d],
                            "without": without, "with_prompt": values, "shared_gain_kept_of_own": kept,
                            "gap_closed": {label: gap_closed(dense[d], without, v) for label, v in values.items()}})
            rows.append([name + (" (held out)" if name not in TRAINED_ON else ""), d, f"{dense[d]:.2f}",
                         f"{without:.2f}", *(_cell(values[label], dense[d], without) for label in prompts),
                         "-" if kept is None else f"{100 * kept:.0f}%"])
    _log(str(records))
    table = markdown_table(["target", "dataset", "dense", "no prompt", f"(a) {a} prompt", f"(b) {b} prompt",
                            "shared prompt (a + b)", "shared keeps of own gain"], rows)
    total = time.perf_counter() - start_all
    cost = "; ".join(f"{label}: {t['seconds'] / 60:.1f} min, {t['seconds_per_step']:.1f} s/step, best C4 validation "
                     f"{t['best_c4_validation_perplexity']:.2f} at step {t['best_step']}" for label, t in training.items())
    notes = (f"Cells: perplexity (gap to dense closed). Shared keeps = (no prompt - shared) / (no prompt - own prompt). "
             f"Every prompt: 100 virtual tokens from the first 100 vocabulary embeddings, AdamW lr {args.lr}, "
             f"{args.steps} steps x {args.batch} x {args.seqlen} C4 tokens, the same windows in the same order, best "
             f"of the validations every {args.eval_steps} steps on 8 held-out C4 windows kept (bench/recovery.py's "
             f"recipe); the shared prompt runs each step's window through (a) and (b) and minimises the mean loss "
             f"(validation: the mean too), so it has the compute of both own prompts together. Training: {cost}. "
             f"Perplexity: first {args.windows} windows of 2048 tokens, {precision_label()}; weights fake-quantized "
             f"(pack=False), C4 calibration {args.nsamples} x 512; {args.threads} threads. Whole run: {total / 60:.1f} min.")
    path = write_results(args.output, title="One prompt for two compression methods (shared) vs own and transferred",
                         settings=dict(vars(args)), machine=machine, table=table,
                         records=records + [{"training": training}], notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
