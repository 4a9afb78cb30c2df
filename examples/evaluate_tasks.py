"""Knowledge-intensive tasks (LLM-KICK) on the embedded SmolLM2: dense vs RTN 4-bit g64, side by side, then a report.

    python examples/evaluate_tasks.py            # about 5 minutes on 2 CPU cores (10 items per task)
"""

import copy

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.evaluation.report import write_report
from hf_compress_prompt.evaluation.tasks import evaluate_tasks

dense, tokenizer = hcp.load_model_and_tokenizer()
compressed = copy.deepcopy(dense)
compress_(compressed, RTNConfig(bits=4, group_size=64), progress=False)  # packed 4-bit layers, no calibration

report = evaluate_tasks({"dense": dense, "rtn-w4-g64": compressed}, tokenizer,
                        ["factoid_qa", "mmlu_0shot", "retrieval_qa"], limit=10,
                        task_options={"factoid_qa": {"max_new_tokens": 16}})
print(report.to_markdown())
print(write_report("out/example_report", tasks=report, title="SmolLM2: dense vs RTN 4-bit"))
