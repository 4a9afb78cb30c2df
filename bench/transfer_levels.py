"""Transfer across compression levels of one method, the paper's setting: a prompt trained on SparseGPT 50% + 4-bit
g64 (setting (a) of bench/recovery.py) applied to SmolLM2 compressed at other sparsities with the same method (or to
either half of the recipe alone), against each target's own prompt trained with the same recipe. Writes
docs/results/transfer_levels.{md,json} (or --output).

bench/recovery.py measures transfer across methods (sparse + 4-bit vs 3-bit vs dropped layers), where it is weak;
this asks whether it holds between neighbouring levels of one method. ``--method PREFIX`` asks the same of the deep
prompt (a prefix of keys and values in every layer): the source prefix and each target's own are prefixes.

    python bench/transfer_levels.py --prompt out/prompts1024/sparsegpt-50%+w4-g64   # a prompt saved by
                                      # `bench/recovery.py --save-prompts out/prompts1024` (else one is trained)
    python bench/transfer_levels.py --method PREFIX --prompt out/prompts/sparsegpt-50%+w4-g64-prefix --steps 64 \
        --eval-steps 16 --output transfer_levels_prefix   # the prefix bench/recovery.py --save-prompts saved
    python bench/transfer_levels.py --steps 4 --windows 1 --targets sparsegpt-60%+w4-g64   # a smoke run
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
from hf_compress_prompt.recovery import RecoveryPrefix, load_recovery_prompt
from hf_compress_prompt.recovery.train import recover
from hf_compress_prompt.recovery.transfer import evaluate_transfer

SOURCE = "sparsegpt-50%+w4-g64"
LEVELS = preset_settings({name: name for name in (
    SOURCE, "sparsegpt-40%+w4-g64", "sparsegpt-60%+w4-g64", "sparsegpt-50%", "gptq-w4-g64")})
DATASETS = ("wikitext2", "ptb")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.models import load_model_and_tokenizer

    targets = [n for n in LEVELS if n != SOURCE]
    parser = bench_parser(__doc__, threads=2, precision=True)
    parser.add_argument("--targets", nargs="+", default=["sparsegpt-40%+w4-g64", "sparsegpt-60%+w4-g64"],
                        choices=targets, metavar="NAME", help=f"target settings: {any_of(targets)}")
    parser.add_argument("--prompt", default=None, metavar="DIR", help=f"a saved prompt trained on {SOURCE} "
                        "(else one is trained here with the same recipe)".replace("%", "%%"))
    parser.add_argument("--method", choices=["PROMPT", "PREFIX"], default="PROMPT",
                        help="the adapter transferred and trained: a prompt, or a prefix (deep prompt)")
    add_prompt_recipe_args(parser, steps=80, eval_steps=20)
    parser.add_argument("--output", default="transfer_levels", help="results name under docs/results")
    args, machine = start_bench(parser, argv)
    start_all = time.perf_counter()
    config = prompt_recipe(args, method=args.method)
    kind = "prefix" if args.method == "PREFIX" else "prompt"

    def ppl(model) -> dict[str, float]:
        return eval_perplexities(model, ids, args.windows)

    def compressed(name: str):
        model, _ = load_model_and_tokenizer()
        compress_(model, Recipe(LEVELS[name], CalibrationConfig(nsamples=args.nsamples)), tokenizer=tokenizer,
                  pack=False, progress=False)
        return model

    model, tokenizer = load_model_and_tokenizer()
    ids = {d: eval_tokens(d, tokenizer, "test") for d in DATASETS}
    dense = ppl(model)
    del model
    if args.prompt:
        source_prompt = load_recovery_prompt(args.prompt)
        if isinstance(source_prompt, RecoveryPrefix) != (args.method == "PREFIX"):
            saved = "a prefix" if isinstance(source_prompt, RecoveryPrefix) else "a prompt"
            raise SystemExit(f"--prompt {args.prompt} holds {saved}, but --method is {args.method}: give "
                             f"--method {'PREFIX' if saved == 'a prefix' else 'PROMPT'}, or a {kind} folder")
        recipe = source_prompt.metadata.get("compression_recipe") or {}
        _log(f"source {kind} from {args.prompt} (trained on {recipe}, {source_prompt.metadata.get('steps')} steps)")
    else:
        model = compressed(SOURCE)
        source_prompt = recover(model, tokenizer, config).prompt
        del model
    rows, records = [], []
    for name in args.targets:
        model = compressed(name)
        own = recover(model, tokenizer, config, attach=False)
        matrix = evaluate_transfer({SOURCE: source_prompt, "own": own.prompt}, {name: model}, ids, dense=dense,
                                   max_windows=args.windows, autocast_bf16=bench_bf16())
        for d in DATASETS:
            without, transferred = matrix.without[(name, d)], matrix.with_prompt[(SOURCE, name, d)]
            mine = matrix.with_prompt[("own", name, d)]
            kept = (without - transferred) / (without - mine) if without > mine else None
            records.append({"target": name, "dataset": d, "dense": dense[d], "without": without,
                            "transferred": transferred, "own": mine, "gain_kept": kept,
                            "own_seconds": own.seconds, "own_best_c4_validation_perplexity": own.best_perplexity})
            rows.append([name, d, f"{dense[d]:.2f}", f"{without:.2f}", f"{transferred:.2f}", f"{mine:.2f}",
                         "-" if kept is None else f"{100 * kept:.0f}%"])
        _log(f"{name}: {[r for r in records if r['target'] == name]}")
        del model
    table = markdown_table(["target", "dataset", "dense", f"no {kind}", f"{SOURCE} {kind}", f"own {kind}",
                            "gain kept"], rows)
    total = time.perf_counter() - start_all
    adapters = ("Prompts: 100 virtual tokens from the first 100 vocabulary embeddings" if kind == "prompt" else
                "Prefixes: 100 key/value pairs in every layer, started as those of the prompt of the first 100 "
                "vocabulary embeddings (PEFT prefix tuning, no projection)")
    notes = (f"Gain kept = (no {kind} - transferred) / (no {kind} - own {kind}). {adapters}, AdamW lr {args.lr}, "
             f"{args.steps} steps x {args.batch} x {args.seqlen} C4 tokens, best of the validations every "
             f"{args.eval_steps} steps kept (bench/recovery.py's recipe); "
             f"source {kind}: {args.prompt or 'trained in this run'}. Perplexity: first {args.windows} windows of "
             f"2048 tokens, {precision_label()}; weights fake-quantized (pack=False), C4 calibration {args.nsamples} x 512; "
             f"{args.threads} threads. Whole run: {total / 60:.1f} min.")
    path = write_results(args.output, title=f"{kind.capitalize()} transfer across compression levels (from {SOURCE})",
                         settings=dict(vars(args)), machine=machine, table=table, records=records, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
