"""LLM-KICK's knowledge-intensive tasks on SmolLM2-135M-Instruct: dense vs SparseGPT 50% + 4-bit g64 vs the same
with its recovery prompt (and deep prompt), in one run. Writes docs/results/llm_kick.{md,json} and the report's PNG.

The compressed model is built here (C4 calibration, weights kept dense and fake-quantized: the numbers the packed
model gives with the exact reference ops). Its recovery adapters are read from --prompt (folders written by
``bench/recovery.py --save-prompts``: a prompt, or the deep prompt saved as ``<setting>-prefix``; each folder is one
more column) or one prompt is trained here (--steps, --lr).

    python bench/llm_kick.py --prompt out/prompts/sparsegpt-50%+w4-g64 out/prompts/sparsegpt-50%+w4-g64-prefix
                                  # the run reported in docs/results
    python bench/llm_kick.py --setting rtn-w4-g64 --limit 2 --mmlu-limit 1 --stories 1 --steps 2   # a smoke run
"""

from __future__ import annotations

import time

from common import (
    RESULTS_DIR,
    bench_parser,
    markdown_table,
    precision_label,
    preset_settings,
    start_bench,
    write_results,
)
from recovery import SETTINGS

from hf_compress_prompt.compressors import CalibrationConfig, Recipe, compress_
from hf_compress_prompt.evaluation.report import write_report
from hf_compress_prompt.evaluation.tasks import evaluate_tasks
from hf_compress_prompt.recovery import attach_recovery_prompt, load_recovery_prompt
from hf_compress_prompt.recovery.prefix import RecoveryPrefix
from hf_compress_prompt.recovery.train import RecoveryConfig, recover

CHOICES = {**SETTINGS, **preset_settings({"rtn-w4-g64": "rtn-w4-g64"})}  # RTN: no calibration, for smoke runs


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    import copy

    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = bench_parser(__doc__, threads=2, precision=True)
    parser.add_argument("--setting", default="sparsegpt-50%+w4-g64", choices=list(CHOICES))
    parser.add_argument("--limit", type=int, default=100, help="items per task (factoid QA, retrieval QA)")
    parser.add_argument("--mmlu-limit", type=int, default=3, help="questions per MMLU subject (57 subjects)")
    parser.add_argument("--stories", type=int, default=10, help="stories per size (small, mid, large)")
    parser.add_argument("--summary-tokens", type=int, default=128, help="new tokens per summary")
    parser.add_argument("--prompt", nargs="+", default=None, metavar="DIR",
                        help="saved recovery prompt (or prefix) folders for the compressed model: one column each")
    parser.add_argument("--steps", type=int, default=100, help="prompt steps when no --prompt is given")
    parser.add_argument("--lr", type=float, default=3e-2, help="prompt learning rate when trained here")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="llm_kick", help="results name under docs/results")
    args, machine = start_bench(parser, argv)
    start = time.perf_counter()

    dense, tokenizer = load_model_and_tokenizer()
    compressed = copy.deepcopy(dense)
    compress_(compressed, Recipe(CHOICES[args.setting], CalibrationConfig(nsamples=args.nsamples)), tokenizer=tokenizer,
              pack=False, progress=False)
    _log("compressed")
    models = {"dense": dense, args.setting: compressed}
    prompt_info = {}  # column -> where its adapter came from
    for folder in args.prompt or []:
        prompt = load_recovery_prompt(folder)
        training = prompt.metadata.get("training", {})
        column = f"{args.setting} + {'prefix' if isinstance(prompt, RecoveryPrefix) else 'prompt'}"
        column = column if column not in models else f"{column} ({folder})"
        prompt_info[column] = {"source": folder, "steps": prompt.metadata.get("steps"),
                               "learning_rate": training.get("learning_rate"), "seqlen": training.get("seqlen"),
                               "best_c4_validation_perplexity": prompt.metadata.get("best_validation_perplexity")}
        models[column] = copy.deepcopy(compressed)
        attach_recovery_prompt(models[column], prompt)
    if not args.prompt:
        result = recover(compressed, tokenizer, RecoveryConfig(max_steps=args.steps, learning_rate=args.lr, seqlen=256,
                                                               eval_steps=max(1, args.steps // 4),
                                                               bf16=args.bf16), attach=False)
        column = f"{args.setting} + prompt"
        prompt_info[column] = {"source": "trained here", "steps": args.steps, "learning_rate": args.lr,
                               "best_c4_validation_perplexity": result.best_perplexity, "seconds": result.seconds}
        models[column] = copy.deepcopy(compressed)
        attach_recovery_prompt(models[column], result.prompt)
    _log(f"recovery adapters: {prompt_info}")

    options = {"summarization": {"max_new_tokens": args.summary_tokens}}
    report = evaluate_tasks(models, tokenizer, ["factoid_qa", "retrieval_qa"], limit=args.limit,
                            batch_size=args.batch_size, progress=False, autocast_bf16=args.bf16)
    _log("factoid and retrieval QA done")
    for tasks, limit in ((["mmlu_0shot", "mmlu_5shot"], args.mmlu_limit), (["summarization"], args.stories)):
        more = evaluate_tasks(models, tokenizer, tasks, limit=limit, batch_size=args.batch_size, progress=False,
                              task_options=options, autocast_bf16=args.bf16)
        for m in models:
            report.results[m].update(more.results[m])
        _log(f"{tasks} done")
    report.settings.update({"limit": args.limit, "mmlu_limit": args.mmlu_limit, "stories_per_size": args.stories,
                            "summary_tokens": args.summary_tokens, "prompt": prompt_info})

    rows = []
    tasks = list(report.results["dense"])
    held = report.holds()
    for t in tasks:
        r0 = report.results["dense"][t]
        for metric in r0.metrics:
            cells = [f"{100 * report.results[m][t].metrics[metric]:.1f}" for m in models]
            mark = [("" if m == "dense" or metric != r0.primary else (" holds" if held[m][t] else " drops"))
                    for m in models]
            rows.append([t, metric, r0.samples] + [c + k for c, k in zip(cells, mark)])
    table = markdown_table(["task", "metric (%)", "items"] + list(models), rows)
    seconds_rows = [[t] + [f"{report.results[m][t].seconds:.0f}" for m in models] for t in tasks]
    table += "\n\nSeconds per task:\n\n" + markdown_table(["task"] + list(models), seconds_rows)
    examples = []
    for m in models:
        for e in report.results[m]["factoid_qa"].examples[:3]:
            examples.append(f"- {m}: {e['question']!r} -> {e['output']!r} (gold {e['gold']!r}, hit {e['hit']})")
    png_dir = RESULTS_DIR / f"{args.output}_report"
    write_report(png_dir, tasks=report, title="LLM-KICK tasks on SmolLM2-135M-Instruct")
    total = time.perf_counter() - start
    notes = (f"![task scores]({args.output}_report/tasks.png)\n\n"
             f"Items: factoid QA and retrieval QA the first {args.limit} each (TriviaQA sample; retrieval QA is the "
             f"CNN/DailyMail cloze set, offline), MMLU the first {args.mmlu_limit} test questions of each of the 57 "
             f"subjects (5-shot: the 5 dev questions), summarization the first {args.stories} stories of each size "
             f"with {args.summary_tokens} new tokens. Greedy decoding, {precision_label()}, batch {args.batch_size}, "
             f"{args.threads} threads. 'holds' = primary metric at least 95% of dense (LLM-KICK's epsilon_0, read as "
             f"relative). Recovery adapters: {prompt_info}. Whole run: {total / 60:.1f} min.\n\nFirst factoid answers:\n\n"
             + "\n".join(examples))
    path = write_results(args.output, title="Knowledge-intensive tasks (LLM-KICK) on compressed SmolLM2-135M-Instruct",
                         settings=dict(vars(args)), machine=machine, table=table, records=[report.to_dict()],
                         notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
