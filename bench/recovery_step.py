"""One recovery training step on SmolLM2-135M-Instruct, before and after the chunked loss: seconds per step, the
loss curves of both (same seed, same data), a profile of each, and the step's operations against this CPU's measured
matmul throughput. Writes docs/results/recovery_step.{md,json}.

The step is the prompt recipe of bench/recovery.py (a 100-token soft prompt, 1 x 1024 C4 tokens, bf16 autocast,
AdamW with warm-up then linear decay, clipping at 1.0) on the model compressed with "sparsegpt-50%+w4-g64"
(`pack=False`: dense fake-quantized fp32 weights). "before" scores the step through the model's own loss (the full
(1, 1124, 49152) logits, then the cross-entropy) under bf16 autocast; "chunked loss" through
`recovery.losses.causal_lm_loss` (the output projection and the cross-entropy in chunks of `--chunk` scored
positions, never all the logits); "after" adds the frozen linear weights held in bf16
(`recovery.precision.frozen_linear_weights_as`), as `recover()` now trains. "recover() before this change" is the
plain step without autocast: what `recover()` ran, because PEFT's `disable_adapter()` around its baseline validation
put back the model's forward without accelerate's autocast wrapper, so every step after it ran in fp32. Both variants
train their own copy of the prompt on the same windows in the same order, one step of each in turn (A B A B ...),
so the load of a shared machine falls on both alike; the figures are medians over the steps after the first.

    python bench/recovery_step.py                  # the run in docs/results/recovery_step.md (2 threads)
    python bench/recovery_step.py --steps 3 --nsamples 4 --no-profile --output recovery_step_smoke
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch
from common import bench_parser, markdown_table, matmul_gflops, preset_settings, start_bench, write_results

from hf_compress_prompt.compressors import CalibrationConfig, Recipe, compress_
from hf_compress_prompt.recovery.data import PromptTuningCollator, TokenWindows, token_windows
from hf_compress_prompt.recovery.losses import causal_lm_loss
from hf_compress_prompt.recovery.precision import frozen_linear_weights_as
from hf_compress_prompt.recovery.train import RecoveryConfig, prompt_tuning_model

SETTING = "sparsegpt-50%+w4-g64"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _plain_loss(model, batch, chunk):
    return model(**batch).loss


def _chunked_loss(model, batch, chunk):
    return causal_lm_loss(model, batch, chunk_size=chunk)[0]


TODAY = "recover() before this change"  # bf16 autocast lost after the baseline validation: fp32 steps
# name -> (the loss: (model, batch, chunk) -> loss, frozen linear weights held in bf16, bf16 autocast)
VARIANTS = {TODAY: (_plain_loss, False, False), "before": (_plain_loss, False, True),
            "chunked loss": (_chunked_loss, False, True), "after": (_chunked_loss, True, True)}


class _Run:
    """One variant's training state: its own model copy and prompt, AdamW and the linear schedule (Trainer's)."""

    def __init__(self, model, config: RecoveryConfig, loss_fn, cast: bool, autocast: bool,
                 stack: contextlib.ExitStack):
        from transformers import get_linear_schedule_with_warmup

        self.model = prompt_tuning_model(model, config)
        self.model.train()
        if cast:  # for the whole run, as LanguageModellingTrainer.train holds them
            stack.enter_context(frozen_linear_weights_as(self.model, torch.bfloat16 if config.bf16 else None))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.schedule = get_linear_schedule_with_warmup(self.optimizer, round(config.warmup_ratio * config.max_steps),
                                                        config.max_steps)
        self.loss_fn, self.config, self.autocast = loss_fn, config, autocast and config.bf16
        self.losses, self.seconds, self.cpu_seconds = [], [], []

    def step(self, batch, chunk):
        start, cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss_fn(self.model, batch, chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - cpu)  # both threads' CPU time: what waiting for a core hides
        self.losses.append(loss.item())


def gradient_agreement(run: _Run, batch, chunk) -> dict[str, float]:
    """The prompt's gradient at the initial prompt, ``|g - g_plain_bf16| / |g_plain_bf16|``, for each variant and for
    the plain loss in fp32 (no autocast): the bf16 noise the variants' differences are measured against."""
    def grad(loss_fn, bf16, cast):
        with contextlib.ExitStack() as inner:
            if cast:
                inner.enter_context(frozen_linear_weights_as(run.model, torch.bfloat16))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(run.model, batch, chunk)
            (g,) = torch.autograd.grad(loss, run.params)
        return g

    reference = grad(_plain_loss, True, False)
    cases = {**{name: (fn, True, cast) for name, (fn, cast, _) in VARIANTS.items() if name not in ("before", TODAY)},
             "before in fp32 (no autocast)": (_plain_loss, False, False)}
    return {name: float((grad(*case) - reference).norm() / reference.norm()) for name, case in cases.items()}


def step_gflop(config, tokens: int, scored: int, prompt: int) -> dict[str, float]:
    """The matmul work of one prompt-tuning step (weights frozen: the backward pass computes input gradients only),
    GFLOP: block linears forward + backward (2 x 2 T N), causal attention (QK^T and PV, about half the T x T scores,
    backward twice the forward), the output projection at ``scored`` positions (forward + backward)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    linear = (2 * h * h + 2 * h * kv + 3 * h * inter) * layers  # q, o; k, v; gate, up, down
    attention = 2 * 2 * h * tokens * (tokens + 1) / 2 * layers  # two (T x T/2 x h) products per layer
    return {"linears": 2 * 2 * tokens * linear / 1e9, "attention": 3 * attention / 1e9,
            "output projection": 2 * 2 * scored * h * config.vocab_size / 1e9, "prompt tokens": prompt}


def profile_step(run: _Run, batch, chunk, top: int) -> tuple[list[dict], float]:
    """One step under ``torch.profiler``: the ``top`` operators by self CPU time with their share, and the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.step(batch, chunk)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return ([{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
              "calls": e.count} for e in events[:top]], total / 1e6)


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = bench_parser(__doc__, threads=2)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per variant (timed and in the curves)")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=100, help="virtual tokens of the prompt")
    parser.add_argument("--lr", type=float, default=3e-2, help="prompt learning rate (bench/recovery.py's)")
    parser.add_argument("--chunk", type=int, default=256, help="scored positions per chunk of the chunked loss")
    parser.add_argument("--setting", default=SETTING, choices=list(preset_settings({SETTING: SETTING})) + ["dense"])
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows (x 512 tokens)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step of each variant")
    parser.add_argument("--output", default="recovery_step", help="results name under docs/results")
    args, machine = start_bench(parser, argv)

    model, tokenizer = load_model_and_tokenizer()
    if args.setting != "dense":
        steps = preset_settings({args.setting: args.setting})[args.setting]
        compress_(model, Recipe(steps, CalibrationConfig(nsamples=args.nsamples)), tokenizer=tokenizer, pack=False,
                  progress=False)
        _log(f"compressed ({args.setting}, {args.nsamples} x 512 calibration tokens)")
    config = RecoveryConfig(num_virtual_tokens=args.tokens, seqlen=args.seqlen, max_steps=args.steps,
                            batch_size=args.batch, learning_rate=args.lr)
    windows = token_windows("c4", tokenizer, args.seqlen, part="train")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))
    data = TokenWindows(windows[order[: args.steps * args.batch]])
    collate = PromptTuningCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    batches = [collate([data[i * args.batch + j] for j in range(args.batch)]) for i in range(args.steps)]

    stack = contextlib.ExitStack()
    runs = {name: _Run(copy.deepcopy(model), config, fn, cast, autocast, stack)  # the same prompt init (seed)
            for name, (fn, cast, autocast) in VARIANTS.items()}
    noise = gradient_agreement(runs["before"], batches[0], args.chunk)
    _log(f"prompt gradient at step 0, relative to plain bf16: {noise}")
    mm = {"before": {f"{d}": matmul_gflops(getattr(torch, d), (2048, 2048, 2048)) for d in ("bfloat16", "float32")}}
    for i, batch in enumerate(batches):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):  # A B C, C B A, ...: none always first
            runs[name].step(batch, args.chunk)
        _log(f"step {i + 1}: " + ", ".join(f"{n} {r.seconds[-1]:.2f} s loss {r.losses[-1]:.4f}" for n, r in runs.items()))
    mm["after"] = {f"{d}": matmul_gflops(getattr(torch, d), (2048, 2048, 2048)) for d in ("bfloat16", "float32")}
    mm["step shape bf16 (1124x576 @ 576x1536)"] = matmul_gflops(torch.bfloat16, (args.seqlen + args.tokens, 576, 1536))

    profiles = {}
    if not args.no_profile:
        extra = collate([data[0]])  # a step beyond the curves: the same for both
        for name, run in runs.items():
            profiles[name] = profile_step(run, extra, args.chunk, top=12)

    stack.close()  # the fp32 weights back
    timed = {n: r.seconds[1:] or r.seconds for n, r in runs.items()}  # the first step of each warms up
    median = {n: statistics.median(t) for n, t in timed.items()}
    cpu = {n: statistics.median(r.cpu_seconds[1:] or r.cpu_seconds) for n, r in runs.items()}
    speedup = median["before"] / median["after"]
    tokens = args.batch * (args.seqlen + args.tokens)
    scored = args.batch * (args.seqlen - 1)
    work = {n: step_gflop(model.config, args.seqlen + args.tokens, tokens if n in ("before", TODAY) else scored, args.tokens)
            for n in runs}
    total_gflop = {n: sum(v for k, v in w.items() if k != "prompt tokens") * args.batch for n, w in work.items()}
    peak = {n: max(mm["before"][d], mm["after"][d]) for n, r in runs.items()
            for d in ["bfloat16" if r.autocast else "float32"]}  # each variant against its matmuls' dtype
    curve_diff = [abs(a - b) for a, b in zip(runs["before"].losses, runs["after"].losses)]
    bf16_noise = noise["before in fp32 (no autocast)"]

    rows = [[n, f"{median[n]:.2f}", f"{median['before'] / median[n]:.2f}x", f"{median[TODAY] / median[n]:.2f}x",
             f"{min(timed[n]):.2f}",
             f"{max(timed[n]):.2f}", f"{cpu[n]:.2f}", len(timed[n]),
             f"{total_gflop[n]:.0f}", f"{total_gflop[n] / median[n]:.0f}", f"{total_gflop[n] / peak[n] / median[n]:.0%}"]
            for n in runs]
    table = markdown_table(["variant", "s/step (median)", "speed-up vs before", "vs recover() before", "min", "max", "CPU s/step (median)", "steps timed", "matmul GFLOP / step",
                            "GFLOP/s achieved", "of measured matmul peak (bf16; fp32 for fp32 steps)"], rows)
    curve = markdown_table(["step", *[f"loss {n}" for n in runs], "|before - after|"],
                           [[i + 1, *[f"{r.losses[i]:.4f}" for r in runs.values()], f"{curve_diff[i]:.4f}"]
                            for i in range(args.steps)])
    profile_md = ""
    for name, (ops, total) in profiles.items():
        profile_md += f"\n\n### Profile: {name} (one step, {total:.2f} s of operator self time)\n\n" + markdown_table(
            ["operator", "self s", "share", "calls"],
            [[o["op"][:60], f"{o['self_s']:.3f}", f"{o['share']:.1%}", o["calls"]] for o in ops])
    notes = (f"**Speed-up {median[TODAY] / median['after']:.2f}x against recover() as it ran before this change** "
             f"({median[TODAY]:.2f} -> {median['after']:.2f} s/step: its steps lost bf16 autocast after the baseline "
             f"validation and ran in fp32), **{speedup:.2f}x against a plain bf16 step** "
             f"({median['before']:.2f} -> {median['after']:.2f} s/step), medians of "
             f"{len(timed['after'])} steps each, interleaved, {machine['torch_threads']} threads). Largest "
             f"|loss difference| over the {args.steps} steps: {max(curve_diff):.4f}. The prompt's gradient at step 0, "
             f"relative difference to the plain bf16 step's: " + ", ".join(f"{k} {v:.2%}" for k, v in noise.items())
             + f" (the last is bf16 autocast's own noise, {bf16_noise:.2%}).\n\n"
             f"Matmul throughput on this CPU (2048^3, median of 7): bf16 {mm['before']['bfloat16']:.0f} / "
             f"{mm['after']['bfloat16']:.0f} GFLOP/s, fp32 {mm['before']['float32']:.0f} / "
             f"{mm['after']['float32']:.0f} GFLOP/s (before / after the steps); the step's own largest linear "
             f"shape in bf16: {mm['step shape bf16 (1124x576 @ 576x1536)']:.0f} GFLOP/s. A step's matmul work "
             f"(GFLOP): " + ", ".join(f"{k} {v:.0f}" for k, v in work["after"].items() if k != "prompt tokens")
             + f" (after; the output projection at {tokens} positions before: "
             f"{work['before']['output projection']:.0f}).\n\n## Loss curves (same seed, same windows)\n\n"
             + curve + profile_md)
    records = [{"variant": n, "seconds_per_step": timed[n], "median_seconds_per_step": median[n],
                "cpu_seconds_per_step": runs[n].cpu_seconds,
                "losses": runs[n].losses, "gflop_per_step": total_gflop[n], "work_gflop": work[n],
                "profile": profiles.get(n)} for n in runs]
    settings = {"setting": args.setting, "nsamples": args.nsamples, "steps": args.steps, "seqlen": args.seqlen,
                "batch": args.batch, "virtual_tokens": args.tokens, "learning_rate": args.lr, "chunk": args.chunk,
                "bf16": config.bf16, "order": "interleaved A B / B A per step", "speedup": speedup,
                "matmul_gflops": mm, "gradient_difference_at_step_0": noise}
    path = write_results(args.output, title="A recovery training step: plain vs chunked loss", settings=settings,
                         machine=machine, table=table, records=records, notes=notes)
    _log(f"speed-up {speedup:.2f}x; wrote {path}")


if __name__ == "__main__":
    main()
