"""Serve a compressed model with its recovery prompt through vLLM, which takes the prompt as embeddings
(``prompt_embeds``; vLLM no longer runs prompt adapters).

Export the model once as compressed-tensors (vLLM loads it; the prompt goes along in ``recovery_prompt/``):

    hcp.export(model, "out/smollm2-ct", tokenizer=tokenizer)

Offline, with vLLM installed here (``--compare`` also runs this package's own ``generate`` on the CPU):

    python examples/serve_vllm.py --model out/smollm2-ct --mode offline --compare

Against a running server (``vllm serve out/smollm2-ct --enable-prompt-embeds``; vLLM need not be installed here):

    python examples/serve_vllm.py --model out/smollm2-ct --mode server --url http://localhost:8000

Each text goes to vLLM as ``[recovery prompt; BOS; text]`` embedded (``hf_compress_prompt.serving.prompt_embeds``),
built from the folder's tokenizer, its ``recovery_prompt/`` and the input embedding weight read from its
safetensors; the model itself is built only for ``--compare``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch

from hf_compress_prompt.serving import completion_request, prompt_embeds

TEXTS = ["The capital of France is", "Quantization makes a language model"]


def input_embedding_weight(folder: Path) -> torch.Tensor:
    """The input embedding weight ``(vocab, hidden)`` from the folder's safetensors, found by building the model's
    skeleton on the meta device (no memory, no weights) and asking it for its input embeddings' name."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    module = skeleton.get_input_embeddings()
    name = next(n for n, m in skeleton.named_modules() if m is module) + ".weight"
    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    with safe_open(str(folder / shard), framework="pt") as f:
        return f.get_tensor(name)


def build_embeds(folder: Path, texts: list[str], chat: bool, dtype: torch.dtype | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    embeds = prompt_embeds(folder / "recovery_prompt", tokenizer, texts, chat=chat,
                           embeddings=input_embedding_weight(folder), dtype=dtype)
    return tokenizer, embeds


def our_generate(folder: Path, tokenizer, texts: list[str], chat: bool, max_tokens: int) -> list[list[int]]:
    """Greedy tokens of this package's own runtime (the prompt attached by ``from_pretrained``), on the CPU."""
    import hf_compress_prompt as hcp

    model = hcp.from_pretrained(folder)
    out = []
    for text in texts:
        if chat:
            enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_dict=True, return_tensors="pt")
        else:
            enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


def offline(args, texts: list[str]) -> None:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        sys.exit(f"vllm is not importable here ({exc}); install it (pip install vllm), or run --mode server "
                 "against `vllm serve MODEL --enable-prompt-embeds`")
    # max_model_len: the CPU build reserves a KV cache for it; gpu_memory_utilization: on the CPU build, the share
    # of RAM vLLM may take (its default, 0.92, fails when anything else holds memory)
    llm = LLM(model=str(args.model), enable_prompt_embeds=True, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.memory_fraction)
    tokenizer, embeds = build_embeds(args.model, texts, args.chat, dtype=llm.model_config.dtype)
    outputs = llm.generate([{"prompt_embeds": e} for e in embeds], SamplingParams(max_tokens=args.max_tokens,
                                                                                 temperature=0.0))
    theirs = [list(o.outputs[0].token_ids) for o in outputs]
    ours = our_generate(args.model, tokenizer, texts, args.chat, args.max_tokens) if args.compare else None
    for i, (text, tokens) in enumerate(zip(texts, theirs)):
        print(f"{text!r} -> vLLM: {tokenizer.decode(tokens, skip_special_tokens=True)!r}")
        if ours is not None:
            same = next((k for k, (a, b) in enumerate(zip(tokens, ours[i])) if a != b), None)
            verdict = ("same tokens" if same is None
                       else f"first differs at token {same}; vLLM runs in {llm.model_config.dtype}, ours on the CPU")
            decoded = tokenizer.decode(ours[i], skip_special_tokens=True)
            print(f"{' ' * len(repr(text))} -> ours: {decoded!r} ({verdict})")


def server(args, texts: list[str]) -> None:
    url = args.url.rstrip("/")
    try:
        name = args.served_model_name or _get(f"{url}/v1/models")["data"][0]["id"]
        _, embeds = build_embeds(args.model, texts, args.chat)
        body = completion_request(name, embeds, max_tokens=args.max_tokens, temperature=0.0)
        reply = _post(f"{url}/v1/completions", body)
    except urllib.error.HTTPError as exc:
        sys.exit(f"the server at {url} answered {exc.code}: {exc.read().decode(errors='replace')[:500]}")
    except urllib.error.URLError as exc:
        sys.exit(f"cannot reach {url} ({exc.reason}); start it with `vllm serve {args.model} --enable-prompt-embeds`")
    for choice in sorted(reply["choices"], key=lambda c: c["index"]):
        print(f"{texts[choice['index']]!r} -> {choice['text']!r}")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", type=Path, required=True,
                        help="a compressed-tensors folder exported by hcp.export, with recovery_prompt/")
    parser.add_argument("--mode", choices=("offline", "server"), default="offline",
                        help="offline: vllm.LLM in this process; server: POST to a running `vllm serve`")
    parser.add_argument("--url", default="http://localhost:8000", help="the server's address (--mode server)")
    parser.add_argument("--served-model-name", help="the server's model name (default: the first it lists)")
    parser.add_argument("--text", action="append", help="a prompt (repeatable; default: two examples)")
    parser.add_argument("--chat", action="store_true", help="wrap each text in the tokenizer's chat template")
    parser.add_argument("--max-tokens", type=int, default=24, help="new tokens per prompt (greedy)")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM's context length (offline)")
    parser.add_argument("--memory-fraction", type=float, default=0.5,
                        help="vLLM's gpu_memory_utilization: on its CPU build, the share of RAM it may reserve")
    parser.add_argument("--compare", action="store_true",
                        help="offline: also generate with this package's own runtime and compare the tokens")
    args = parser.parse_args()
    if not (args.model / "recovery_prompt").is_dir():
        parser.error(f"{args.model} has no recovery_prompt/ folder; export a model with a prompt attached")
    texts = args.text or TEXTS
    (offline if args.mode == "offline" else server)(args, texts)


if __name__ == "__main__":
    main()
