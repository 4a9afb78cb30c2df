"""Where the recovery budget pays, at equal compute: prompt lengths, prompt vs prefix vs LoRA, C4 vs text the dense
model writes itself, on setting (a) (SparseGPT 50% + 4-bit g64) of SmolLM2-135M-Instruct. Writes
docs/results/<output>.{md,json,png}.

Every arm gets the same budget of this process's CPU time (user + system seconds, read from the kernel: other
processes on the box do not eat into it, as they would into wall time on a shared machine). Its step count comes
from a short probe of its own step time (`budget / seconds per step`, so each arm's warm-up and linear decay run in
full), and a callback stops it at the budget if the probe was optimistic. Validation (every quarter of its steps,
best kept) counts inside the budget. Each arm is then scored on WikiText-2 / PTB perplexity (first --windows windows
of 2048 tokens) and on the LLM-KICK subset (factoid QA, MMLU 0-shot, open-book retrieval; first --limit items,
--mmlu-limit per subject), beside the dense and compressed models.

Data arms: "c4" (the paper's text, validated on held-out C4 documents); "self" (the dense model's unconditional
samples from BOS: no dataset at all, validated on held-out samples); "self-chat" (the dense model's chat-template
answers to held-out questions: TriviaQA items after the evaluated ones and MMLU validation questions, never the test
questions). The generated text is made once and cached (hf_compress_prompt.recovery.generated); its cost is
reported apart.

    python bench/recovery_budget.py                                   # every arm, --minutes each
    python bench/recovery_budget.py --arms prompt-25 prompt-100 --minutes 1 --limit 4 --mmlu-limit 1 --windows 1
    python bench/recovery_budget.py --generate-only                  # fill the generated-text cache
"""

from __future__ import annotations

import copy
import os
import time

from common import (
    RESULTS_DIR,
    bench_bf16,
    bench_parser,
    eval_perplexities,
    markdown_table,
    precision_label,
    preset_settings,
    start_bench,
    write_results,
)
from transformers import TrainerCallback

from hf_compress_prompt.compressors import CalibrationConfig, Recipe, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.recovery.data import TokenWindows
from hf_compress_prompt.recovery.generated import generated_split, settings_for
from hf_compress_prompt.recovery.train import RecoveryConfig, recover
from hf_compress_prompt.recovery.transfer import gap_closed

SETTING = "sparsegpt-50%+w4-g64"
DATASETS = ("wikitext2", "ptb")
KICK_TASKS = ("factoid_qa", "mmlu_0shot", "retrieval_qa")
# arm -> (RecoveryConfig overrides, training data)
ARMS = {
    "prompt-25": ({"num_virtual_tokens": 25}, "c4"),
    "prompt-50": ({"num_virtual_tokens": 50}, "c4"),
    "prompt-100": ({"num_virtual_tokens": 100}, "c4"),
    "prompt-200": ({"num_virtual_tokens": 200}, "c4"),
    "prompt-400": ({"num_virtual_tokens": 400}, "c4"),
    "prefix-100": ({"method": "PREFIX", "num_virtual_tokens": 100, "prefix_projection": False}, "c4"),
    "prefix-100-projection": ({"method": "PREFIX", "num_virtual_tokens": 100, "prefix_projection": True}, "c4"),
    "lora-r8": ({"method": "LORA", "learning_rate": 2e-4}, "c4"),
    "prompt-100-self": ({"num_virtual_tokens": 100}, "self"),
    "prompt-100-self-chat": ({"num_virtual_tokens": 100}, "self-chat"),
}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuBudget(TrainerCallback):
    """Stops training once this process has used ``seconds`` of CPU time since ``on_train_begin`` (and evaluates
    that last step, so it competes for the best); records each step's CPU time."""

    def __init__(self, seconds: float):
        self.seconds, self.step_seconds, self.stopped_early = seconds, [], False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = _cpu_seconds()

    def on_step_end(self, args, state, control, **kwargs):
        now = _cpu_seconds()
        self.step_seconds.append(now - self.last)
        self.last = now
        if now - self.start >= self.seconds and state.global_step < state.max_steps:
            control.should_training_stop = control.should_evaluate = True
            self.stopped_early = True
        return control

    @property
    def used(self) -> float:
        return self.last - self.start


def _questions(limit_after: int, count: int) -> list[str]:
    """Held-out questions for the chat data: TriviaQA items after the first ``limit_after`` (the evaluated ones)
    and the first MMLU validation question of each subject (the evaluation reads the test split), as text."""
    from hf_compress_prompt.evaluation.tasks import data

    trivia = [r["question"] for r in data.triviaqa()[max(1000, limit_after):]]
    mmlu = []
    for rows in data.mmlu("val").values():
        r = rows[0]
        options = " ".join(f"{c}. {o}" for c, o in zip(data.MMLU_CHOICES, r["choices"]))
        mmlu.append(f"{r['question']} {options}")
    n_mmlu = min(len(mmlu), count // 4)
    return mmlu[:n_mmlu] + trivia[: count - n_mmlu]


def _generated_data(dense, tokenizer, kind: str, args) -> tuple[TokenWindows, TokenWindows, dict]:
    """Training and validation windows of the dense model's own text, as ``recover(dataset="generated")`` makes
    them (the validation windows are the last --eval-windows ones, never trained on)."""
    start = time.perf_counter()
    if kind == "self":
        settings, questions = settings_for("continuations", args.self_texts, args.self_tokens), None
    else:
        settings, questions = settings_for("chat", args.chat_texts, args.chat_tokens), _questions(args.limit,
                                                                                                  args.chat_texts)
    try:
        train, valid = generated_split(dense, tokenizer, args.seqlen, args.eval_windows, settings, questions=questions)
    except UserInputError as exc:
        raise SystemExit(f"{kind}: {exc}") from None
    info = {"settings": settings.__dict__, "texts": min(settings.count, len(questions or [None] * settings.count)),
            "windows": int(train.shape[0] + valid.shape[0]), "seconds_to_read_or_generate": time.perf_counter() - start}
    return TokenWindows(train), TokenWindows(valid), info


def _probe(model, tokenizer, config: RecoveryConfig, data: dict) -> float:
    """The arm's CPU seconds per training step: median of steps 2-3 of a 3-step run on a copy of ``model``."""
    probe = CpuBudget(float("inf"))
    recover(copy.deepcopy(model), tokenizer, RecoveryConfig(**{**config.to_dict(), "max_steps": 3, "eval_steps": 3,
                                                                "eval_windows": 1}),
            attach=False, callbacks=[probe], **data)
    return sorted(probe.step_seconds[1:])[len(probe.step_seconds[1:]) // 2]


def _kick(models: dict, tokenizer, args) -> dict:
    from hf_compress_prompt.evaluation.tasks import evaluate_tasks

    report = evaluate_tasks(models, tokenizer, ["factoid_qa", "retrieval_qa"], limit=args.limit, batch_size=8,
                            progress=False, autocast_bf16=bench_bf16())
    mmlu = evaluate_tasks(models, tokenizer, ["mmlu_0shot"], limit=args.mmlu_limit, batch_size=8, progress=False,
                          autocast_bf16=bench_bf16())
    for m in models:
        report.results[m].update(mmlu.results[m])
    return report


def _kick_scores(report, model: str) -> dict:
    r = report.results[model]
    return {"factoid_qa": r["factoid_qa"].metrics["accuracy"], "mmlu_0shot": r["mmlu_0shot"].metrics["accuracy"],
            "open_book_hit": r["retrieval_qa"].metrics["open_book_hit"]}


def _plot(records: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in records.items():
        curve = [(e["cpu_minutes"], 100 * e["validation_drop"]) for e in r["curve"]]
        if curve:
            ax.plot(*zip(*curve), marker="o", label=name)
    ax.set_xlabel("training CPU minutes")
    ax.set_ylabel("validation perplexity drop (% of its baseline)")
    ax.set_title("Recovery of SparseGPT 50% + 4-bit g64 SmolLM2 at equal CPU time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = bench_parser(__doc__, threads=2, precision=True)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--minutes", type=float, default=6.0, help="CPU minutes of training per arm (user + system)")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-2, help="prompt / prefix learning rate (LoRA: 2e-4)")
    parser.add_argument("--eval-windows", type=int, default=8, help="validation windows of --seqlen tokens")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 / PTB test windows of 2048 tokens")
    parser.add_argument("--limit", type=int, default=60, help="factoid / retrieval QA items")
    parser.add_argument("--mmlu-limit", type=int, default=2, help="MMLU 0-shot test questions per subject")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows (x 512 tokens)")
    parser.add_argument("--self-texts", type=int, default=256, help="unconditional samples of the dense model")
    parser.add_argument("--self-tokens", type=int, default=320, help="tokens per unconditional sample")
    parser.add_argument("--chat-texts", type=int, default=256, help="chat answers of the dense model")
    parser.add_argument("--chat-tokens", type=int, default=160, help="tokens per chat answer at most")
    parser.add_argument("--generate-only", action="store_true", help="fill the generated-text cache and stop")
    parser.add_argument("--no-kick", action="store_true", help="perplexity only")
    parser.add_argument("--output", default="recovery_budget", help="results name under docs/results")
    args, machine = start_bench(parser, argv)
    start_all = time.perf_counter()

    dense, tokenizer = load_model_and_tokenizer()
    kinds = sorted({ARMS[a][1] for a in args.arms} - {"c4"}) if not args.generate_only else ["self", "self-chat"]
    generated = {kind: _generated_data(dense, tokenizer, kind, args) for kind in kinds}
    for kind, (_, _, info) in generated.items():
        _log(f"{kind}: {info}")
    if args.generate_only:
        return
    ids = {d: eval_tokens(d, tokenizer, "test") for d in DATASETS}
    dense_ppl = eval_perplexities(dense, ids, args.windows)
    compressed = copy.deepcopy(dense)
    compress_(compressed, Recipe(preset_settings({SETTING: SETTING})[SETTING], CalibrationConfig(nsamples=args.nsamples)),
              tokenizer=tokenizer, pack=False, progress=False)
    compressed_ppl = eval_perplexities(compressed, ids, args.windows)
    _log(f"dense {dense_ppl}, compressed {compressed_ppl}")

    records, recovered_models = {}, {}
    for arm in args.arms:
        overrides, data_kind = ARMS[arm]
        config = RecoveryConfig(**{"seqlen": args.seqlen, "batch_size": args.batch, "learning_rate": args.lr,
                                   "eval_windows": args.eval_windows, "max_steps": 4, "bf16": args.bf16,
                                   **overrides})
        data = {} if data_kind == "c4" else {"train_dataset": generated[data_kind][0],
                                             "eval_dataset": generated[data_kind][1]}
        per_step = _probe(compressed, tokenizer, config, data)
        steps = max(4, int(60 * args.minutes / per_step))
        config = RecoveryConfig(**{**config.to_dict(), "max_steps": steps, "eval_steps": max(1, steps // 4)})
        budget = CpuBudget(60 * args.minutes)
        model = copy.deepcopy(compressed)
        wall = time.perf_counter()
        result = recover(model, tokenizer, config, callbacks=[budget], **data)
        wall = time.perf_counter() - wall
        trained = model if result.prompt is not None else result.trained  # a prompt / prefix is attached to model
        values = eval_perplexities(trained, ids, args.windows)
        baseline = result.baseline_perplexity
        curve = [{"step": e["step"], "cpu_minutes": sum(budget.step_seconds[: e["step"]]) / 60,
                  "perplexity": e["perplexity"]} for e in result.history if not e.get("baseline")]
        records[arm] = {
            "config": config.to_dict(), "data": data_kind, "probe_cpu_seconds_per_step": per_step,
            "steps_planned": steps, "steps_run": len(budget.step_seconds), "stopped_at_budget": budget.stopped_early,
            "train_cpu_seconds": budget.used, "train_wall_seconds": wall,
            "trainable_parameters": result.trainable_parameters, "best_step": result.best_step,
            "validation_baseline": baseline, "validation_best": result.best_perplexity,
            "perplexity": values, "gap_closed": {d: gap_closed(dense_ppl[d], compressed_ppl[d], values[d])
                                                 for d in DATASETS},
            "curve": curve,
        }
        recovered_models[arm] = trained
        _log(f"{arm}: {len(budget.step_seconds)} steps in {budget.used / 60:.1f} CPU min ({wall / 60:.1f} wall min), "
             f"{values}, gap closed {records[arm]['gap_closed']}")

    kick = None
    if not args.no_kick:
        kick = _kick({"dense": dense, SETTING: compressed, **{f"+ {a}": m for a, m in recovered_models.items()}},
                     tokenizer, args)
        for arm in args.arms:
            records[arm]["kick"] = _kick_scores(kick, f"+ {arm}")
        _log("LLM-KICK subset done")

    # the curve: each validation's perplexity drop as a share of the arm's own baseline (its validation data differ
    # between data arms, so absolute validation perplexities do not compare; WikiText-2 / PTB in the table do)
    for r in records.values():
        b = r["validation_baseline"]
        for e in r["curve"]:
            e["validation_drop"] = (b - e["perplexity"]) / b if b else 0.0
    png = RESULTS_DIR / f"{args.output}.png"
    _plot(records, png)

    header = ["arm", "data", "trainable", "steps", "CPU min", "wall min", "wikitext2", "gap", "ptb", "gap"]
    if kick is not None:
        header += ["factoid %", "MMLU 0-shot %", "open-book hit %"]
    rows = [["dense", "-", "-", "-", "-", "-", f"{dense_ppl['wikitext2']:.2f}", "", f"{dense_ppl['ptb']:.2f}", ""]
            + ([f"{100 * v:.1f}" for v in _kick_scores(kick, "dense").values()] if kick else []),
            [SETTING, "-", "-", "-", "-", "-", f"{compressed_ppl['wikitext2']:.2f}", "0%", f"{compressed_ppl['ptb']:.2f}",
             "0%"] + ([f"{100 * v:.1f}" for v in _kick_scores(kick, SETTING).values()] if kick else [])]
    for arm, r in records.items():
        row = [arm, r["data"], r["trainable_parameters"], r["steps_run"], f"{r['train_cpu_seconds'] / 60:.1f}",
               f"{r['train_wall_seconds'] / 60:.1f}", f"{r['perplexity']['wikitext2']:.2f}",
               f"{100 * r['gap_closed']['wikitext2']:.0f}%", f"{r['perplexity']['ptb']:.2f}",
               f"{100 * r['gap_closed']['ptb']:.0f}%"]
        if kick is not None:
            row += [f"{100 * v:.1f}" for v in r["kick"].values()]
        rows.append(row)
    table = markdown_table(header, rows)
    if kick is not None:
        held = kick.holds()
        table += "\n\nLLM-KICK 'holds' (within 5% of dense, relative) per arm: " + "; ".join(
            f"{m}: {', '.join(t for t, h in held[m].items() if h) or 'none'}" for m in held)
    gen_rows = [[k, info["texts"], info["windows"], f"{info['seconds_to_read_or_generate']:.0f}"]
                for k, (_, _, info) in generated.items()]
    if gen_rows:
        table += "\n\nGenerated text (made once by the dense model, cached; seconds = this run's read or generation):\n\n"
        table += markdown_table(["data", "texts", f"windows of {args.seqlen}", "seconds"], gen_rows)
    total = time.perf_counter() - start_all
    notes = (f"![validation perplexity drop vs CPU minutes]({png.name})\n\n"
             f"Each arm: {args.minutes:g} CPU minutes of training (this process's user + system time; "
             f"{args.threads} threads), batch {args.batch} x {args.seqlen} tokens, lr {args.lr:g} (LoRA 2e-4), "
             f"10% warm-up then linear decay over the probed step count, validation every quarter on "
             f"{args.eval_windows} held-out windows of its own data, best kept. Perplexity: first {args.windows} "
             f"windows of 2048 tokens, {precision_label()}. LLM-KICK subset: factoid QA and retrieval QA first {args.limit} "
             f"items, MMLU 0-shot first {args.mmlu_limit} test questions per subject; greedy, chat template. Gap = "
             f"(compressed - recovered) / (compressed - dense). Compression: C4 calibration {args.nsamples} x 512, "
             f"weights kept dense (fake-quantized). Whole run: {total / 60:.1f} min wall.")
    path = write_results(args.output, title="Recovery at equal CPU time: prompt length, prompt vs prefix vs LoRA, "
                         "C4 vs the model's own text (SparseGPT 50% + 4-bit g64 SmolLM2-135M-Instruct)",
                         settings=dict(vars(args)), machine=machine, table=table,
                         records=[{"dense": dense_ppl, "compressed": compressed_ppl,
                                   "generated": {k: info for k, (_, _, info) in generated.items()},
                                   "kick": None if kick is None else kick.to_dict()},
                                  *({"arm": a, **r} for a, r in records.items())], notes=notes)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
