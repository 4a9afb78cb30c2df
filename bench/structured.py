"""Structured pruning of SmolLM2-135M-Instruct: Compresso (learned L0 gates + LoRA, collaborative prompt) against
one-shot L2-magnitude head/channel pruning (and a random choice as control) and layer dropping at the same
parameter count, each then recovered with
a soft prompt. Writes docs/results/structured.{md,json}.

For each target (fraction of all parameters removed): Compresso trains its gates with LoRA on C4 windows (no
instruction set is reachable offline) and cuts the model at the target; the magnitude baseline is cut to Compresso's
actual parameter count; layer dropping removes the whole number of layers closest to it (angular distance, C4
calibration). Reported: WikiText-2 / PTB perplexity (first --windows windows of 2048 tokens, bf16 autocast where
fast, else fp32: --precision) without
and with a soft prompt trained for --prompt-steps on C4 (Compresso's own collaborative text prompt is reported too),
prefill time and greedy decode tokens/s of the smaller dense shapes (prompts off, fp32, median of --speed-reps), the
LLM-KICK subset (factoid QA, MMLU 0-shot) for the first target, and training cost.

    python bench/structured.py                          # the full run reported in docs/results (under an hour)
    python bench/structured.py --targets 0.2 --steps 4 --prompt-steps 2 --windows 1 --no-kick   # a smoke run
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import bench_parser, eval_perplexities, markdown_table, precision_label, start_bench, write_results

from hf_compress_prompt.compressors import CalibrationConfig, LayerDropConfig, Recipe, compress_
from hf_compress_prompt.compressors.compresso import CompressoConfig, compresso_prune
from hf_compress_prompt.compressors.structured import count_parameters, prune_structured
from hf_compress_prompt.recovery import detach_recovery_prompt, recovery_prompt_of
from hf_compress_prompt.recovery.train import RecoveryConfig, recover

DATASETS = ("wikitext2", "ptb")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@torch.no_grad()
def _speed(model, ids: torch.Tensor, reps: int) -> dict[str, float]:
    """Prefill of 512 tokens (ms) and greedy decode of 64 new tokens after 32 (tokens/s), medians of ``reps``; the
    recovery prompt (if any) is switched off so only the model's shapes count."""
    state = recovery_prompt_of(model)
    if state is not None:
        model.disable_recovery_prompt()
    prefill, decode = [], []
    for _ in range(reps):
        start = time.perf_counter()
        model(ids[:, :512], use_cache=False)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(ids[:, :32], attention_mask=torch.ones(1, 32, dtype=torch.long), max_new_tokens=64,
                       min_new_tokens=64, do_sample=False, pad_token_id=0)
        decode.append(64 / (time.perf_counter() - start))
    if state is not None:
        model.enable_recovery_prompt()
    return {"prefill_ms": 1000 * statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode)}


def _prompt(model, tokenizer, ids, args) -> dict:
    """A soft prompt trained on ``model`` (replacing any attached one) and the perplexities with it."""
    result = recover(model, tokenizer, RecoveryConfig(max_steps=args.prompt_steps, learning_rate=args.prompt_lr,
                                                      seqlen=args.seqlen, batch_size=args.batch, eval_steps=max(1, args.prompt_steps // 2),
                                                      eval_windows=4, bf16=args.bf16))
    values = eval_perplexities(model, ids, args.windows)
    detach_recovery_prompt(model)
    return {"perplexity": values, "seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
            "best_c4_validation_perplexity": result.best_perplexity}


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = bench_parser(__doc__, threads=2, precision=True)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.2, 0.3], help="fractions of parameters removed")
    parser.add_argument("--steps", type=int, default=100, help="Compresso training steps")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-hidden", action="store_true", help="Compresso prunes heads and channels only")
    parser.add_argument("--multiple-of", type=int, default=32, help="Compresso keeps channel / hidden counts in "
                        "multiples of this (group quantization and kernels need it)")
    parser.add_argument("--prompt-steps", type=int, default=30, help="soft-prompt steps on each pruned model")
    parser.add_argument("--prompt-lr", type=float, default=3e-2)
    parser.add_argument("--no-prompts", action="store_true", help="skip soft-prompt recovery")
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 / PTB test windows of 2048 tokens")
    parser.add_argument("--nsamples", type=int, default=16, help="layer-dropping calibration windows (x 512 tokens)")
    parser.add_argument("--speed-reps", type=int, default=3)
    parser.add_argument("--no-kick", action="store_true", help="skip the LLM-KICK subset")
    parser.add_argument("--kick-limit", type=int, default=40, help="factoid questions")
    parser.add_argument("--mmlu-limit", type=int, default=1, help="MMLU questions per subject")
    parser.add_argument("--results-name", default="structured", help="docs/results/<name>.{md,json}")
    args, machine = start_bench(parser, argv)
    start_all = time.perf_counter()

    dense, tokenizer = load_model_and_tokenizer()
    ids = {d: eval_tokens(d, tokenizer, "test") for d in DATASETS}
    speed_ids = ids["wikitext2"][:, :512] if ids["wikitext2"].dim() == 2 else ids["wikitext2"][None, :512]
    params_dense = count_parameters(dense)
    per_layer = sum(p.numel() for p in dense.model.layers[0].parameters())
    records = {"dense": {"parameters": params_dense, "perplexity": eval_perplexities(dense, ids, args.windows),
                         "speed": _speed(dense, speed_ids, args.speed_reps)}}
    _log(f"dense: {records['dense']}")
    kick_models = {"dense": dense}
    rows, cost_rows = [], []

    def add_row(target, name, rec):
        p = rec.get("prompt", {}).get("perplexity", {})
        rows.append([f"{target:.0%}", name, f"{rec['parameters'] / 1e6:.1f}",
                     f"{1 - rec['parameters'] / params_dense:.1%}",
                     *(f"{rec['perplexity'][d]:.2f}" for d in DATASETS),
                     *(f"{p[d]:.2f}" if d in p else "-" for d in DATASETS),
                     f"{rec['speed']['prefill_ms']:.0f}", f"{rec['speed']['decode_tokens_per_s']:.1f}",
                     f"{rec['speed']['decode_tokens_per_s'] / records['dense']['speed']['decode_tokens_per_s']:.2f}x"])

    add_row(0, "dense", records["dense"])
    for target in args.targets:
        key = f"{target:.0%}"
        # Compresso
        model = copy.deepcopy(dense)
        config = CompressoConfig(target=target, max_steps=args.steps, seqlen=args.seqlen, batch_size=args.batch,
                                 prune_hidden=not args.no_hidden, multiple_of=args.multiple_of)
        result = compresso_prune(model, tokenizer, config)
        pruned = result.model
        del model
        with_text = eval_perplexities(pruned, ids, args.windows)  # the collaborative prompt is attached
        pruned.disable_recovery_prompt()
        without = eval_perplexities(pruned, ids, args.windows)
        pruned.enable_recovery_prompt()
        compresso = {"parameters": result.parameters_after, "perplexity": without,
                     "with_collaborative_prompt": with_text, "speed": _speed(pruned, speed_ids, args.speed_reps),
                     "training": result.summary(), "history": result.history}
        _log(f"compresso {key}: {result.summary()} ppl {without} / with its text prompt {with_text}")
        cost_rows.append([key, "Compresso (gates + LoRA r8)", result.trainable_parameters, args.steps,
                          f"{result.seconds_per_step:.1f}", f"{result.seconds:.0f}"])
        # one-shot magnitude at the same parameter count
        magnitude, _ = prune_structured(dense, result.removed_fraction)
        mag = {"parameters": count_parameters(magnitude), "perplexity": eval_perplexities(magnitude, ids, args.windows),
               "speed": _speed(magnitude, speed_ids, args.speed_reps)}
        _log(f"magnitude {key}: {mag['parameters']} ppl {mag['perplexity']}")
        shuffled, _ = prune_structured(dense, result.removed_fraction, criterion="random")
        rand = {"parameters": count_parameters(shuffled), "perplexity": eval_perplexities(shuffled, ids, args.windows),
                "speed": mag["speed"]}  # the same shapes as the magnitude model
        del shuffled
        _log(f"random {key}: ppl {rand['perplexity']}")
        # layer dropping: the whole number of layers closest to the same count
        count = max(1, round((params_dense - result.parameters_after) / per_layer))
        dropped = copy.deepcopy(dense)
        compress_(dropped, Recipe([LayerDropConfig(num_layers=count)], CalibrationConfig(nsamples=args.nsamples)),
                  tokenizer=tokenizer, pack=False, progress=False)
        drop = {"parameters": count_parameters(dropped), "layers_dropped": count,
                "perplexity": eval_perplexities(dropped, ids, args.windows),
                "speed": _speed(dropped, speed_ids, args.speed_reps)}
        _log(f"drop {count} layers: {drop['parameters']} ppl {drop['perplexity']}")
        if not args.no_prompts:
            for name, rec, m in (("compresso", compresso, pruned), ("magnitude", mag, magnitude),
                                 ("layer drop", drop, dropped)):
                rec["prompt"] = _prompt(m, tokenizer, ids, args)
                _log(f"{name} {key} + soft prompt: {rec['prompt']['perplexity']}")
                cost_rows.append([key, f"soft prompt on {name}", 100 * m.config.hidden_size, args.prompt_steps,
                                  f"{rec['prompt']['seconds_per_step']:.1f}", f"{rec['prompt']['seconds']:.0f}"])
        add_row(target, "Compresso (no prompt)", compresso)
        rows.append([key, "Compresso + its collaborative text prompt", "", "",
                     *(f"{with_text[d]:.2f}" for d in DATASETS), "-", "-", "", "", ""])
        add_row(target, "one-shot L2 magnitude", mag)
        add_row(target, "one-shot random (control; speed = magnitude's)", rand)
        add_row(target, f"drop {count} layers", drop)
        records[key] = {"compresso": compresso, "magnitude": mag, "random": rand, "layer_drop": drop}
        if target == args.targets[0] and not args.no_kick:
            kick_models.update({f"compresso {key}": pruned, f"magnitude {key}": magnitude,
                                f"drop {count} layers": dropped})
        else:
            del pruned, magnitude, dropped

    kick_table = ""
    if len(kick_models) > 1:
        from hf_compress_prompt.evaluation.tasks import evaluate_tasks

        start = time.perf_counter()
        report = evaluate_tasks(kick_models, tokenizer, ["factoid_qa"], limit=args.kick_limit, progress=False,
                                autocast_bf16=args.bf16)
        mmlu = evaluate_tasks(kick_models, tokenizer, ["mmlu_0shot"], limit=args.mmlu_limit, progress=False,
                              autocast_bf16=args.bf16)
        for m in kick_models:
            report.results[m].update(mmlu.results[m])
        records["kick"] = {**report.to_dict(), "seconds": time.perf_counter() - start}
        kick_table = ("\n\nLLM-KICK subset at the first target (Compresso with no prompt: soft prompts were trained "
                      f"and detached above; factoid QA {args.kick_limit} questions, MMLU 0-shot {args.mmlu_limit} "
                      "per subject, greedy, chat template):\n\n" + report.to_markdown())
        _log(f"kick: {report.to_markdown()}")

    header = ["target", "model", "params (M)", "removed", *(f"{d}" for d in DATASETS),
              *(f"{d} + soft prompt" for d in DATASETS), "prefill 512 (ms)", "decode tok/s", "decode vs dense"]
    table = markdown_table(header, rows)
    table += (f"\n\nTraining cost ({args.batch} x {args.seqlen} C4 tokens a step, {args.threads} threads):\n\n"
              + markdown_table(["target", "what", "trainable parameters", "steps", "s / step", "train s"], cost_rows))
    table += kick_table
    total = time.perf_counter() - start_all
    notes = (
        f"Perplexity: first {args.windows} windows of 2048 tokens, {precision_label()}. Compresso: {args.steps} steps, "
        "gates on heads, FFN channels" + ("" if args.no_hidden else " and hidden dimensions") + ", LoRA r8 (lr 2e-4), "
        "gates and multipliers lr 0.1, target reached linearly over the first half, cut at the target parameter "
        f"count by one threshold on P(gate open) (widths in multiples of {args.multiple_of}), collaborative prompt in "
        "training. Soft prompts: 100 tokens, "
        f"{args.prompt_steps} steps, lr {args.prompt_lr}, on C4. Speed: fp32, prompts off, median of "
        f"{args.speed_reps}; decode = 64 greedy tokens after 32. Layer dropping: angular distance on "
        f"{args.nsamples} x 512 C4 tokens. Whole run: {total / 60:.1f} min."
    )
    path = write_results(args.results_name, title="Structured pruning of SmolLM2-135M-Instruct: Compresso vs one-shot "
                         "baselines, with soft-prompt recovery", settings=vars(args), machine=machine, table=table,
                         records=[records], notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
