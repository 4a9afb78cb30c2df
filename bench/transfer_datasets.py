"""Transfer across datasets: how much of an in-domain prompt's gain does the C4-trained prompt keep? On SmolLM2
compressed with setting (a) of bench/recovery.py (SparseGPT 50% + 4-bit g64), prompts are trained with the same
recipe on C4 (the paper's and the bench's), on WikiText-2's validation split and on PTB's validation split (the
local data has no train split of either; each is cut by rows into training and validation parts), and every prompt is
scored on both test sets. Writes docs/results/transfer_datasets.{md,json} (or --output).

    python bench/transfer_datasets.py                  # the run reported in docs/results/transfer_datasets.md
    python bench/transfer_datasets.py --steps 2 --eval-steps 1 --windows 1 --nsamples 4   # a smoke run
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
from hf_compress_prompt.recovery.data import TokenWindows, token_windows
from hf_compress_prompt.recovery.train import recover
from hf_compress_prompt.recovery.transfer import evaluate_transfer, gap_closed

SETTINGS = preset_settings({name: name for name in ("sparsegpt-50%+w4-g64", "gptq-w3-g64")})  # recovery.py's (a), (b)
TRAIN_ON = {"c4": "train", "wikitext2": "validation", "ptb": "validation"}  # corpus -> the split trained on
TEST_SETS = ("wikitext2", "ptb")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = bench_parser(__doc__, threads=2, precision=True)
    parser.add_argument("--setting", default="sparsegpt-50%+w4-g64", choices=list(SETTINGS), metavar="NAME",
                        help=f"compression: {any_of(SETTINGS)}")
    add_prompt_recipe_args(parser, steps=64, eval_steps=16)
    parser.add_argument("--output", default="transfer_datasets", help="results name under docs/results")
    args, machine = start_bench(parser, argv)
    start_all = time.perf_counter()
    config = prompt_recipe(args)

    model, tokenizer = load_model_and_tokenizer()
    ids = {d: eval_tokens(d, tokenizer, "test") for d in TEST_SETS}
    dense = eval_perplexities(model, ids, args.windows)
    _log(f"dense: {dense}")
    start = time.perf_counter()
    compress_(model, Recipe(SETTINGS[args.setting], CalibrationConfig(nsamples=args.nsamples)), tokenizer=tokenizer,
              pack=False, progress=False)
    _log(f"{args.setting}: compressed in {time.perf_counter() - start:.0f} s")

    prompts, training = {}, {}
    for corpus, split in TRAIN_ON.items():
        windows = {part: token_windows(corpus, tokenizer, args.seqlen, part=part, split=split,
                                       max_windows=8 if part == "valid" else None) for part in ("train", "valid")}
        result = recover(model, tokenizer, config, attach=False, train_dataset=TokenWindows(windows["train"]),
                         eval_dataset=TokenWindows(windows["valid"]))
        label = f"{corpus} ({split})"
        prompts[label] = result.prompt
        training[label] = {"train_windows": len(windows["train"]), "seconds": result.seconds,
                           "seconds_per_step": result.seconds_per_step, "best_step": result.best_step,
                           "best_validation_perplexity": result.best_perplexity}
        _log(f"{label}: {training[label]}")
    matrix = evaluate_transfer(prompts, {args.setting: model}, ids, dense=dense, max_windows=args.windows,
                               autocast_bf16=bench_bf16())

    rows, records = [], []
    c4 = next(iter(prompts))
    for d in TEST_SETS:
        without = matrix.without[(args.setting, d)]
        values = {label: matrix.with_prompt[(label, args.setting, d)] for label in prompts}
        in_domain = values[f"{d} (validation)"]
        kept = (without - values[c4]) / (without - in_domain) if without > in_domain else None
        records.append({"test_set": d, "dense": dense[d], "without": without, "with_prompt": values,
                        "gap_closed": {label: gap_closed(dense[d], without, v) for label, v in values.items()},
                        "c4_gain_kept_of_in_domain": kept})
        rows.append([d, f"{dense[d]:.2f}", f"{without:.2f}",
                     *(f"{v:.2f} ({100 * gap_closed(dense[d], without, v):.0f}%)" for v in values.values()),
                     "-" if kept is None else f"{100 * kept:.0f}%"])
    _log(str(records))
    table = markdown_table(["test set", "dense", "no prompt", *(f"prompt trained on {label}" for label in prompts),
                            "C4 prompt keeps of the in-domain prompt's gain"], rows)
    total = time.perf_counter() - start_all
    cost = "; ".join(f"{label}: {t['train_windows']} training windows, {t['seconds'] / 60:.1f} min, best validation "
                     f"{t['best_validation_perplexity']:.2f} at step {t['best_step']}" for label, t in training.items())
    notes = (f"Model: SmolLM2-135M-Instruct compressed with {args.setting} (weights fake-quantized, pack=False, C4 "
             f"calibration {args.nsamples} x 512). Cells: test perplexity (gap to dense closed); the in-domain prompt "
             f"of a test set was trained on that corpus' validation split, never on its test split. Every prompt: 100 "
             f"virtual tokens from the first 100 vocabulary embeddings, AdamW lr {args.lr}, {args.steps} steps x "
             f"{args.batch} x {args.seqlen} tokens, best of the validations every {args.eval_steps} steps on 8 windows "
             f"of its corpus' held-out rows kept (bench/recovery.py's recipe). Training: {cost}. Perplexity: first "
             f"{args.windows} windows of 2048 tokens, {precision_label()}; {args.threads} threads. Whole run: "
             f"{total / 60:.1f} min.")
    path = write_results(args.output, title=f"Prompt transfer across datasets on {args.setting}",
                         settings=dict(vars(args)), machine=machine, table=table,
                         records=records + [{"training": training}], notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
