"""End-to-end generation speed of SmolLM2-135M-Instruct: dense fp32, dense bf16, packed 4-bit and packed
50% + 4-bit. Writes docs/results/decode_<threads>t.{md,json}.

For each setting and batch size: prefill time of a --prompt-tokens prompt (WikiText-2 text), then greedy decoding
of --new-tokens tokens (no end-of-sequence token, so every run has the full length), median of --reps runs. A
second pass with timing hooks on every linear layer splits a decode step into time inside linear layers and
everything else (framework overhead: attention, norms, sampling, Python). Resident memory = bytes of the loaded
tensors. Rows named "... + torch.compile, static cache" use transformers' compiled decoding instead; rows named
"... + DynamicCache" or "... + GrowingCache" pass that cache to every forward and generate call (without the suffix:
transformers' default, a DynamicCache, and with a recovery prompt the runtime's default, a GrowingCache). A second
table sets each "+ 100-token recovery prompt" row beside the same setting without the prompt: the cost per decode
step of the prompt's 100 extra cached positions; a third measures that cost on the prompted row's own model,
disabling and enabling the prompt between alternating calls (--ab-pairs), free of drift between rows (this box's
speed swings by 20-30% between runs a few seconds apart: the profiler once showed the same ops 30% slower in one
generate than in the next). With --prefix-ab-pairs, a prompted row's model also alternates the prompt with a
recovery prefix of the same length (method PREFIX: its keys and values in every layer, here the prompt's own,
`prefix_of_prompt`): what a prefix costs per decode step against a prompt of the same length.

The packed settings use RTN 4-bit g64 and magnitude 50% (the speed depends only on the format); their layers run
the C kernels when this machine can build them (`hf_compress_prompt.kernels.status()`). The tied 49152 x 576
embedding / LM head stays bf16 unless the setting quantizes the head too ("+ 4-bit head": `lm_head=True`, the head
untied and RTN 4-bit g64, the embedding kept; "+ 8-bit head": `lm_head_bits=8`, the int8 kernel). "fp32 act.": the model is compressed in bf16, then everything that is
not packed (embedding, norms, attention, activations) runs in fp32, as `from_pretrained(..., dtype=torch.float32)`
gives; on this CPU bf16 attention (SDPA) is several times slower than fp32 at one query token.

    python bench/decode.py --threads 1
    python bench/decode.py --settings "dense bf16" "packed 4-bit g64" --batch 1 --new-tokens 32
    python bench/decode.py --output decode_prompt_1t --settings "packed 4-bit g64 + 4-bit head, fp32 act."{,\
        " + 100-token recovery prompt"}{," + DynamicCache"," + GrowingCache"}   # the prompt's decode cost
    python bench/decode.py --output decode_prefix_ab_1t --batch 1 8 --ab-pairs 0 --prefix-ab-pairs 9 --settings \
        "packed 4-bit g64 + 4-bit head, fp32 act. + 100-token recovery prompt"   # prefix vs prompt, same length
"""

from __future__ import annotations

import copy
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import any_of, bench_parser, markdown_table, preset_settings, start_bench, write_results

from hf_compress_prompt.compressors import Recipe, compress_
from hf_compress_prompt.kernels import cpu, status
from hf_compress_prompt.nn import PackedLinear, layer_status
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt, prefix_of_prompt

_BF16, _FP32 = torch.bfloat16, torch.float32
# name -> (dtype the model is compressed in, preset, dtype it runs in: activations, norms, attention, embedding)
_SETTINGS = {
    "dense fp32": (_FP32, None, _FP32),
    "dense bf16": (_BF16, None, _BF16),
    "packed 4-bit g64": (_BF16, "rtn-w4-g64", _BF16),
    "packed 4-bit g64 + 4-bit head": (_BF16, "rtn-w4-g64-head4", _BF16),
    "packed 4-bit g64 + 4-bit head, fp32 act.": (_BF16, "rtn-w4-g64-head4", _FP32),
    "packed 4-bit g64 + 8-bit head, fp32 act.": (_BF16, "rtn-w4-g64-head8", _FP32),
    "packed 50% + 4-bit g64": (_BF16, "magnitude-50%+rtn-w4-g64", _BF16),
    "packed 50% + 4-bit g64 + 4-bit head, fp32 act.": (_BF16, "magnitude-50%+rtn-w4-g64-head4", _FP32),
}
_STEPS = preset_settings({name: preset for name, (_, preset, _) in _SETTINGS.items()})
SETTINGS = {name: (dtype, _STEPS[name], run_dtype) for name, (dtype, _, run_dtype) in _SETTINGS.items()}
# The same compressed-tensors checkpoint (--ct-model) opened two ways: name -> (opened by, dtype it runs in)
CT_SETTINGS = {
    "compressed-tensors W4A16, transformers native": ("transformers", _BF16),
    "compressed-tensors W4A16, hf_compress_prompt": ("hf_compress_prompt", _BF16),
    "compressed-tensors W4A16, transformers native, fp32": ("transformers", _FP32),
    "compressed-tensors W4A16, hf_compress_prompt, fp32 act.": ("hf_compress_prompt", _FP32),
}
SETTINGS.update({name: (run_dtype, None, run_dtype) for name, (_, run_dtype) in CT_SETTINGS.items()})
PROMPT_SUFFIX = " + 100-token recovery prompt"  # any setting + this: a prompt attached (its values do not matter)
COMPILE_SUFFIX = " + torch.compile, static cache"  # any setting + this: transformers' compiled decoding
CACHE_SUFFIXES = (" + DynamicCache", " + GrowingCache")  # any setting (+ prompt) + this: that cache, passed in


def parse_setting(name: str) -> tuple[str, bool, str | None, bool]:
    """``<base>[ + 100-token recovery prompt][ + DynamicCache | + GrowingCache][ + torch.compile, static cache]``
    -> (base, prompt, cache suffix or None, compiled)."""
    compiled = name.endswith(COMPILE_SUFFIX)
    name = name.removesuffix(COMPILE_SUFFIX)
    cache = next((c for c in CACHE_SUFFIXES if name.endswith(c)), None)
    name = name.removesuffix(cache or "")
    prompt = name.endswith(PROMPT_SUFFIX)
    base = name.removesuffix(PROMPT_SUFFIX)
    if base not in SETTINGS or (compiled and cache):
        raise SystemExit(f"unknown setting {name!r}: {any_of(SETTINGS)} (+ prompt)(+ cache | + compile)")
    return base, prompt, cache, compiled


def _cache_factory(model, cache: str | None):
    """A fresh cache per call for the "+ <cache>" rows; ``None`` leaves the choice to generate / the runtime."""
    from transformers import DynamicCache

    from hf_compress_prompt.nn import GrowingCache

    kind = {" + DynamicCache": DynamicCache, " + GrowingCache": GrowingCache, None: None}[cache]
    return None if kind is None else (lambda: {"cache": kind(config=model.config)})


def _default_ct_checkpoint(folder) -> str:
    """A W4A16 checkpoint like the Hub's (symmetric int4, groups of 64, lm_head kept): the embedded model, RTN
    quantized here and written by ``hcp.export`` (compressed-tensors' own decompressor reads it bit for bit; the
    tests check that)."""
    import hf_compress_prompt as hcp
    from hf_compress_prompt.compressors import RTNConfig
    from hf_compress_prompt.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(dtype=_BF16)
    compress_(model, RTNConfig(bits=4, group_size=64, symmetric=True), progress=False)
    return str(hcp.export(model, folder, tokenizer=tokenizer))


def _open_ct(path: str, opened_by: str, dtype: torch.dtype):
    """The checkpoint opened natively by transformers (decompressed to dense on the first forward; asymmetric
    checkpoints with ``dequantize=True``, see docs/deploy.md) or by this package (packed modules, no decompression)."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    import hf_compress_prompt as hcp

    tokenizer = AutoTokenizer.from_pretrained(path)
    if opened_by == "hf_compress_prompt":
        return hcp.from_pretrained(path, dtype=dtype).eval(), tokenizer
    quant = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    asymmetric = any(not g["weights"].get("symmetric", True) for g in quant["config_groups"].values())
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asymmetric else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval(), tokenizer


def _resident(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class LinearTimer:
    """Forward hooks that add up the wall time spent inside every linear layer."""

    def __init__(self, model):
        self.seconds, self._start, self._handles = 0.0, {}, []
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, PackedLinear)):
                self._handles.append(module.register_forward_pre_hook(self._pre))
                self._handles.append(module.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _post(self, module, args, out):
        self.seconds += time.perf_counter() - self._start.pop(id(module))

    def remove(self):
        for h in self._handles:
            h.remove()


def _generation_config(model, new_tokens: int):
    """Greedy, exactly ``new_tokens`` tokens: no end-of-sequence token, so nothing stops early. (Forcing the length
    with ``min_new_tokens`` instead adds a logits processor that scans the 49152-token vocabulary twice per step,
    about 0.5 ms, a cost of the benchmark rather than of decoding.)"""
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return config


def _compiled(config):
    """transformers' own compiled decoding: a static KV cache, and the decode step compiled by ``torch.compile``
    (inductor; transformers compiles on accelerators only unless told, and its default mode asks for CUDA graphs)."""
    from transformers import CompileConfig

    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True
    config.update(cache_implementation="static", compile_config=compile_config)
    return config


def measure(model, prompt: torch.Tensor, new_tokens: int, reps: int, compiled: bool = False, cache=None) -> dict:
    """``cache``: ``None`` or a function returning fresh keyword arguments that pass a cache (one per call)."""
    attention = torch.ones_like(prompt)
    config = _generation_config(model, new_tokens)
    kwargs = dict(attention_mask=attention, generation_config=_compiled(config) if compiled else config)
    fresh = cache or dict
    with torch.no_grad():
        start = time.perf_counter()
        if compiled:  # the first call compiles (for this batch size and cache length)
            model.generate(prompt, **kwargs)
        else:
            model.generate(prompt, attention_mask=attention, generation_config=_generation_config(model, 4), **fresh())
        warm_up = time.perf_counter() - start
        prefill, total = [], []
        for _ in range(reps):
            start = time.perf_counter()
            model(prompt, attention_mask=attention, **fresh())
            prefill.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = model.generate(prompt, **kwargs, **fresh())
            total.append(time.perf_counter() - start)
        assert out.shape[1] == prompt.shape[1] + new_tokens
        share = hooked = None
        if not compiled:  # hooks inside a compiled graph would time nothing meaningful
            timer = LinearTimer(model)
            start = time.perf_counter()
            model.generate(prompt, **kwargs, **fresh())
            hooked = time.perf_counter() - start
            timer.remove()
            share = timer.seconds / hooked
    p, t = statistics.median(prefill), statistics.median(total)
    decode = max(t - p, 1e-9)
    batch = prompt.shape[0]
    return {"prefill_s": p, "generate_s": t, "decode_s": decode, "tokens_per_s": batch * new_tokens / decode,
            "ms_per_step": 1e3 * decode / new_tokens, "hooked_generate_s": hooked, "linear_share_of_generate": share,
            "warm_up_s": warm_up}


def _alternating_steps(model, prompt: torch.Tensor, new_tokens: int, pairs: int, cache, states: dict, *,
                       warm: bool = False) -> dict[str, list[float]]:
    """ms per decode step in each of two ``states`` (name -> a function that puts ``model`` in that state), one
    figure per pair, alternating (pair i runs the states in order for even i, reversed for odd i) so both see the
    same weights, kernels and the machine's drift. Per call, a decode step = (generate of 1 + ``new_tokens`` tokens
    - generate of 1 token) / ``new_tokens``: prefill cancels out. ``warm``: one untimed call after entering a state."""
    attention = torch.ones_like(prompt)
    short, long = _generation_config(model, 1), _generation_config(model, 1 + new_tokens)
    fresh = cache or dict

    def timed(config) -> float:
        start = time.perf_counter()
        model.generate(prompt, attention_mask=attention, generation_config=config, **fresh())
        return time.perf_counter() - start

    names = list(states)
    steps = {name: [] for name in names}
    with torch.no_grad():
        for i in range(pairs):
            for name in (names if i % 2 == 0 else names[::-1]):
                states[name]()
                if warm:
                    timed(short)
                one = timed(short)
                steps[name].append(1e3 * max(timed(long) - one, 1e-9) / new_tokens)
    return steps


def measure_prompt_ab(model, prompt: torch.Tensor, new_tokens: int, pairs: int, cache=None) -> dict:
    """The prompt's decode cost on one model object: generate with the prompt disabled and enabled, alternating
    (:func:`_alternating_steps`). Ratio = median over pairs of (with / without)."""
    from hf_compress_prompt.recovery import disable_recovery_prompt, enable_recovery_prompt

    try:
        steps = _alternating_steps(model, prompt, new_tokens, pairs, cache,
                                   {"without": lambda: disable_recovery_prompt(model),
                                    "with": lambda: enable_recovery_prompt(model)})
    finally:
        enable_recovery_prompt(model)
    ratios = [on / off for on, off in zip(steps["with"], steps["without"])]
    return {"pairs": pairs, "ms_per_step_without": statistics.median(steps["without"]),
            "ms_per_step_with": statistics.median(steps["with"]), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "steps_without": steps["without"],
            "steps_with": steps["with"]}


def measure_prefix_ab(model, prompt: torch.Tensor, new_tokens: int, pairs: int, cache=None) -> dict:
    """A recovery prefix's decode cost against the prompt of the same length on one model object: the attached
    prompt and its prefix (``prefix_of_prompt``: the same keys and values, so the same tokens) attached in turn,
    alternating (:func:`_alternating_steps`); each attach is followed by an untimed call (the prompt's cache is
    computed once per attach). Ratio = median over pairs of (prefix / prompt)."""
    from hf_compress_prompt.recovery import recovery_prompt_of

    soft = recovery_prompt_of(model)
    deep = prefix_of_prompt(model, soft)
    try:
        steps = _alternating_steps(model, prompt, new_tokens, pairs, cache,
                                   {"prompt": lambda: attach_recovery_prompt(model, soft),
                                    "prefix": lambda: attach_recovery_prompt(model, deep)}, warm=True)
    finally:
        attach_recovery_prompt(model, soft)
    ratios = [deep_ms / soft_ms for deep_ms, soft_ms in zip(steps["prefix"], steps["prompt"])]
    return {"pairs": pairs, "ms_per_step_prompt": statistics.median(steps["prompt"]),
            "ms_per_step_prefix": statistics.median(steps["prefix"]), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "steps_prompt": steps["prompt"],
            "steps_prefix": steps["prefix"]}


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def attention_microbench(kv_length: int = 256, reps: int = 7, calls: int = 200) -> dict:
    """Median microseconds of one decode-step SDPA call at SmolLM2's shape (9 query heads, 3 KV heads, head dim 64),
    bf16 against fp32: why the "fp32 act." settings exist."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(1, 9, 1, 64, dtype=dtype)
        k, v = (torch.randn(1, 3, kv_length, 64, dtype=dtype) for _ in range(2))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(calls):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            times.append((time.perf_counter() - start) / calls * 1e6)
        out[str(dtype).split(".")[1]] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> None:
    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.models import load_model_and_tokenizer

    parser = bench_parser(__doc__, threads=1)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        help=any_of(SETTINGS, f"; any of them + {PROMPT_SUFFIX.strip()!r}, then + one of "
                                               f"{[c.strip() for c in CACHE_SUFFIXES]} or + {COMPILE_SUFFIX.strip()!r}"))
    parser.add_argument("--output", default=None, help="results name (default: decode_<threads>t)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ct-model", default=None,
                        help="compressed-tensors checkpoint for the 'compressed-tensors ...' rows (default: the embedded "
                             "model RTN int4 g64 symmetric, exported here)")
    parser.add_argument("--ab-pairs", type=int, default=9,
                        help="for prompted rows: pairs of generate calls with the prompt disabled / enabled on the same "
                             "model, alternating (0: skip)")
    parser.add_argument("--prefix-ab-pairs", type=int, default=0,
                        help="for prompted rows: pairs of generate calls with the prompt and a recovery prefix of the "
                             "same length attached in turn on the same model, alternating (0: skip)")
    args, machine = start_bench(parser, argv)
    sdpa = attention_microbench()
    print(f"SDPA, one query over 256 keys: bf16 {sdpa['bfloat16']:.0f} us, fp32 {sdpa['float32']:.0f} us", flush=True)
    records = []
    parsed = {name: parse_setting(name) for name in args.settings}  # unknown names fail before any measurement
    scratch = tempfile.TemporaryDirectory(prefix="decode-ct-")
    ct_model = args.ct_model
    if ct_model is None and any(parsed[n][0] in CT_SETTINGS for n in args.settings):
        ct_model = _default_ct_checkpoint(Path(scratch.name) / "w4a16-g64")
    for name in args.settings:
        base_name, prompted, cache, compiled = parsed[name]
        dtype, steps, run_dtype = SETTINGS[base_name]
        gc.collect()  # the previous setting's model and its kernel layouts are gone before this one is measured
        cache_before = cpu.cache_bytes()
        if base_name in CT_SETTINGS:
            model, tokenizer = _open_ct(ct_model, CT_SETTINGS[base_name][0], run_dtype)
        else:
            model, tokenizer = load_model_and_tokenizer()
            model = model.to(dtype)
            if steps:
                compress_(model, Recipe(steps), progress=False)
            model = model.to(run_dtype)  # what from_pretrained(..., dtype=run_dtype) gives: packed codes stay as stored
        if prompted:
            hidden = model.config.hidden_size
            soft = RecoveryPrompt(torch.randn(100, hidden, generator=torch.Generator().manual_seed(0)) * 0.02)
            attach_recovery_prompt(model, soft)
        kernels = sorted(set(layer_status(model).values()))
        stream = eval_tokens("wikitext2", tokenizer, "test")[0]
        for batch in args.batch:
            n = args.prompt_tokens
            prompt = torch.stack([stream[i * n: (i + 1) * n] for i in range(batch)])  # (batch, n)
            record = {"setting": name, "batch": batch, "dtype": str(run_dtype).split(".")[1],
                      "kernels": kernels, **measure(model, prompt, args.new_tokens, args.reps, compiled,
                                                              _cache_factory(model, cache))}
            record["resident_MB"] = _resident(model) / 1e6  # after the runs: transformers decompresses on first use
            record["kernel_cache_MB"] = (cpu.cache_bytes() - cache_before) / 1e6 if steps or kernels else 0.0
            if prompted and not compiled and args.ab_pairs:
                record["prompt_ab"] = measure_prompt_ab(model, prompt, args.new_tokens, args.ab_pairs,
                                                        _cache_factory(model, cache))
            if prompted and not compiled and args.prefix_ab_pairs:
                record["prefix_ab"] = measure_prefix_ab(model, prompt, args.new_tokens, args.prefix_ab_pairs,
                                                        _cache_factory(model, cache))
                print(f"{name} batch {batch}: prefix / prompt per decode step {record['prefix_ab']['ratio']:.3f}x",
                      flush=True)
            records.append(record)
            print(f"{name} batch {batch}: {record['tokens_per_s']:.1f} tokens/s, prefill {record['prefill_s'] * 1e3:.0f} ms, "
                  f"linear share {_percent(record['linear_share_of_generate'])}, warm-up {record['warm_up_s']:.0f} s",
                  flush=True)
        del model
    base = {(r["setting"], r["batch"]): r for r in records}
    header = ["setting", "batch", "tokens/s", "vs fp32", "vs bf16", "ms per step", "prefill ms", "linear layers share",
              "resident MB", "kernel cache MB"]
    rows = []
    for r in records:
        fp32, bf16 = base.get(("dense fp32", r["batch"])), base.get(("dense bf16", r["batch"]))
        rows.append([r["setting"], r["batch"], f"{r['tokens_per_s']:.1f}",
                     f"{r['tokens_per_s'] / fp32['tokens_per_s']:.2f}x" if fp32 else "-",
                     f"{r['tokens_per_s'] / bf16['tokens_per_s']:.2f}x" if bf16 else "-",
                     f"{r['ms_per_step']:.1f}", f"{r['prefill_s'] * 1e3:.0f}",
                     _percent(r["linear_share_of_generate"]), f"{r['resident_MB']:.0f}",
                     f"{r['kernel_cache_MB']:.0f}"])
    table = markdown_table(header, rows)
    overhead = []  # each prompted row beside the same setting, cache and batch without the prompt
    for r in records:
        base_name, prompted, cache, compiled = parsed[r["setting"]]
        if not prompted:
            continue
        twin = r["setting"].replace(PROMPT_SUFFIX, "", 1)
        plain = next((t for t in records if t["setting"] == twin and t["batch"] == r["batch"]), None)
        if plain is None:
            continue
        r["prompt_cost_vs"] = twin
        r["prompt_cost_ratio"] = r["ms_per_step"] / plain["ms_per_step"]
        caches = ("torch.compile, static" if compiled else cache.strip(" +") if cache
                  else "default (DynamicCache / GrowingCache with the prompt)")
        overhead.append([base_name, caches, r["batch"], f"{plain['ms_per_step']:.1f}", f"{r['ms_per_step']:.1f}",
                         f"{r['prompt_cost_ratio']:.2f}x"])
    if overhead:
        table += ("\n\nWhat the 100-token recovery prompt costs per decode step (same setting, cache and batch, "
                  "measured in this run):\n\n" + markdown_table(
                      ["setting", "cache", "batch", "ms per step without prompt", "with prompt", "ratio"], overhead))
    ab = [[r["setting"].replace(PROMPT_SUFFIX, "", 1), r["batch"], f"{r['prompt_ab']['ms_per_step_without']:.1f}",
           f"{r['prompt_ab']['ms_per_step_with']:.1f}", f"{r['prompt_ab']['ratio']:.2f}x",
           f"{r['prompt_ab']['ratio_min']:.2f}x .. {r['prompt_ab']['ratio_max']:.2f}x"]
          for r in records if r.get("prompt_ab")]
    if ab:
        table += ("\n\nThe same cost measured on one model object, the prompt disabled and enabled between calls "
                  f"({args.ab_pairs} alternating pairs; a call's decode step = (generate of 1 + {args.new_tokens} "
                  "tokens - generate of 1 token) / its new tokens, so prefill cancels): the fairer comparison, free "
                  "of the drift between rows measured minutes apart. Ratio: median over the pairs, then the range."
                  "\n\n" + markdown_table(["setting", "batch", "median ms per step, prompt disabled", "enabled",
                                            "ratio (median of pairs)", "range over pairs"], ab))
    deep = [[r["setting"].replace(PROMPT_SUFFIX, "", 1), r["batch"], f"{r['prefix_ab']['ms_per_step_prompt']:.2f}",
             f"{r['prefix_ab']['ms_per_step_prefix']:.2f}", f"{r['prefix_ab']['ratio']:.3f}x",
             f"{r['prefix_ab']['ratio_min']:.3f}x .. {r['prefix_ab']['ratio_max']:.3f}x"]
            for r in records if r.get("prefix_ab")]
    if deep:
        table += ("\n\nA recovery prefix (method PREFIX: keys and values in every layer; here the 100-token prompt's "
                  "own, so both give the same tokens) against the 100-token prompt, attached in turn on one model "
                  f"object ({args.prefix_ab_pairs} alternating pairs, an untimed call after each attach; decode step as "
                  "above). Ratio: median over the pairs of prefix / prompt, then the range.\n\n" + markdown_table(
                      ["setting", "batch", "median ms per step, 100-token prompt", "100-token prefix",
                       "ratio (median of pairs)", "range over pairs"], deep))
    notes = (
        f"Greedy `generate`, {args.new_tokens} new tokens after a {args.prompt_tokens}-token WikiText-2 prompt per "
        f"sequence; decode time = median generate time - median prefill time over {args.reps} runs; {args.threads} "
        "thread(s). 'Linear layers share': fraction of a hooked generate run spent inside the 210 block linears and "
        "the LM head (the rest is attention, norms, KV cache, sampling and Python: framework overhead; not measured "
        f"for compiled rows). '{COMPILE_SUFFIX.strip()}': transformers' static KV cache with the decode step compiled "
        "by `torch.compile` (inductor); its first generate per batch size compiles (warm-up seconds in the JSON). "
        "Resident MB: the model's parameters and buffers; kernel cache MB: what the CPU kernels add at first use, on "
        "top (the int4 layers' 16-row tile copies with fp32 scales and uint8 zeros, int8 layers' fp32 scales; this "
        "model's layers only). Kernels used by packed layers: see the JSON ('kernels'). One SDPA call at a decode step (9 query heads, 3 KV heads, 256 keys), median of 7 x "
        f"200 calls in this run: bf16 {sdpa['bfloat16']:.0f} us, fp32 {sdpa['float32']:.0f} us (x 30 layers per token)."
    )
    if any(parsed[n][0] in CT_SETTINGS for n in args.settings):
        pairs = []
        for r in records:
            opened_by = CT_SETTINGS.get(parsed[r["setting"]][0], (None,))[0]
            if opened_by != "hf_compress_prompt":
                continue
            twin_name = r["setting"].replace("hf_compress_prompt", "transformers native").replace(", fp32 act.", ", fp32")
            twin = next((t for t in records if t["setting"] == twin_name and t["batch"] == r["batch"]), None)
            if twin is not None:
                r["vs_transformers_native"] = r["tokens_per_s"] / twin["tokens_per_s"]
                pairs.append([twin_name.removesuffix(", fp32").replace(", transformers native", ""), r["dtype"],
                              r["batch"], f"{twin['tokens_per_s']:.1f}", f"{r['tokens_per_s']:.1f}",
                              f"{r['vs_transformers_native']:.2f}x", f"{twin['resident_MB']:.0f}",
                              f"{r['resident_MB']:.0f} + {r['kernel_cache_MB']:.0f}"])
        if pairs:
            table += ("\n\nThe same compressed-tensors checkpoint opened natively by transformers (which decompresses "
                      "it to dense weights on the first forward) and by hf_compress_prompt (packed modules, C kernels), "
                      f"measured in this run ({ct_model if args.ct_model else 'default: the embedded model RTN int4 g64 symmetric, exported by hcp.export'})"
                      ":\n\n" + markdown_table(["checkpoint", "dtype", "batch", "transformers tokens/s",
                                                 "hf_compress_prompt tokens/s", "ratio", "transformers resident MB",
                                                 "hf_compress_prompt resident + kernel cache MB"], pairs))
    settings = {"settings": args.settings, "batch": args.batch, "ct_model": args.ct_model, "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens, "reps": args.reps, "ab_pairs": args.ab_pairs,
                "prefix_ab_pairs": args.prefix_ab_pairs, "threads": args.threads,
                "kernel_status": status(), "sdpa_decode_step_us": sdpa}
    path = write_results(args.output or f"decode_{args.threads}t", title=f"Generation speed, SmolLM2-135M-Instruct, {args.threads} thread(s)",
                         settings=settings, machine=machine, table=table, records=records,
                         notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
