"""The vLLM side of bench/vllm_serving.py, run by the Python of a virtual environment that has vLLM (it pins its own
transformers, so it does not import hf_compress_prompt). Reads the requests bench/vllm_serving.py wrote (``prompt_embeds``
tensors), generates greedily with vLLM's offline ``LLM``, and writes the tokens and timings as JSON.

    /path/to/vllm-venv/bin/python bench/vllm_serving_worker.py REQUESTS.pt RESULT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("requests", help="the .pt file bench/vllm_serving.py wrote")
    parser.add_argument("result", help="where to write the JSON result")
    args = parser.parse_args()
    import torch
    from vllm import LLM, SamplingParams

    requests = torch.load(args.requests, weights_only=True)
    llm = LLM(model=requests["model"], dtype=requests["dtype"], enforce_eager=True, max_model_len=requests["max_model_len"],
              enable_prompt_embeds=True, enable_prefix_caching=False, seed=0, gpu_memory_utilization=0.5)
    params = SamplingParams(temperature=0, max_tokens=requests["new_tokens"], ignore_eos=True)
    check = llm.generate([{"prompt_embeds": e} for e in requests["check"]], params, use_tqdm=False)
    out = {"check_tokens": [list(o.outputs[0].token_ids) for o in check], "timings": {}}
    for batch, embeds in requests["speed"].items():
        prompts = [{"prompt_embeds": e} for e in embeds]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up at this batch size
        seconds = []
        for _ in range(requests["reps"]):
            start = time.perf_counter()
            result = llm.generate(prompts, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        assert all(len(r.outputs[0].token_ids) == requests["new_tokens"] for r in result)
        out["timings"][str(batch)] = {"seconds": seconds, "median_s": statistics.median(seconds)}
    import vllm

    out["vllm_version"], out["torch_threads"] = vllm.__version__, torch.get_num_threads()
    with open(args.result, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this module
    main()
