"""On-disk and resident size of SmolLM2-135M-Instruct's packed checkpoints, against the fp16 checkpoint, plus the
round trip (compress -> save -> from_pretrained) checked on the real model. Writes docs/results/compressed_size.{md,json}.

Sizes depend only on the storage format, not on how the codes were chosen, so the quantized settings use RTN
and the sparse ones magnitude pruning (seconds instead of minutes); GPTQ / SparseGPT / Wanda produce the same
formats (tests/integrations round-trip every method).

    python bench/compressed_size.py                       # every setting
    python bench/compressed_size.py --settings int4-g64   # a subset

For each setting: compress in fp32 and save; reload with AutoModelForCausalLM and compare logits on
--tokens tokens of WikiText-2 (max abs difference, fp32); cast to fp16, save again and measure the safetensors
(file bytes, and bytes of the compressed linears from the header); reload in fp16 and count the bytes the
tensors hold in memory (--loads loads, median load time).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import any_of, bench_parser, markdown_table, preset_settings, start_bench, write_results

import hf_compress_prompt as hcp  # registers the quantization method
from hf_compress_prompt.compressors import Recipe, compress_
from hf_compress_prompt.integrations.safetensors_check import checkpoint_tensors
from hf_compress_prompt.nn import PackedLinear

SETTINGS: dict[str, list] = preset_settings({  # row label -> preset (the storage format decides the size)
    "fp16 (dense)": None,
    "int8-g64": "rtn-w8-g64",
    "int4-g64": "rtn-w4-g64",
    "int4-perchannel": "rtn-w4-perchannel",
    "int3-g64": "rtn-w3-g64",
    "2:4 (fp16 values)": "magnitude-2:4",
    "50% bitmask (fp16 values)": "magnitude-50%",
    "2:4 + int4-g64": "magnitude-2:4+rtn-w4-g64",
    "50% bitmask + int4-g64": "magnitude-50%+rtn-w4-g64",
})

_LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_block_linear_tensor(name: str) -> bool:
    module = name.rsplit(".", 1)[0]
    return ".layers." in name and module.endswith(_LINEAR_SUFFIXES)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _header_bytes(folder: Path, select) -> int:
    sizes = {"int32": 4, "uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4}
    total = 0
    for name, info in checkpoint_tensors(sorted(folder.glob("*.safetensors"))).items():
        if select(name):
            n = 1
            for d in info["shape"]:
                n *= d
            total += n * sizes[info["dtype"]]
    return total


def _resident(model) -> tuple[int, int]:
    """(bytes of the block linears' tensors, bytes of every distinct parameter and buffer) held in memory."""
    seen, total, linear = set(), 0, 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.data_ptr() in seen:
            continue  # tied embeddings count once
        seen.add(tensor.data_ptr())
        size = tensor.numel() * tensor.element_size()
        total += size
        if _is_block_linear_tensor(name):
            linear += size
    return linear, total


def run(args) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from hf_compress_prompt.data import eval_tokens
    from hf_compress_prompt.models import default_model_path, load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer()
    ids = eval_tokens("wikitext2", tokenizer, "test")[:, : args.tokens]  # (1, tokens)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.settings:
            steps = SETTINGS[name]
            record: dict = {"setting": name, "recipe": [s.to_dict() for s in steps]}
            if steps:  # round trip in fp32
                model, _ = load_model_and_tokenizer(default_model_path())
                compress_(model, Recipe(steps), progress=False)
                with torch.no_grad():
                    expected = model(ids).logits
                hcp.save_pretrained(model, tmp / "fp32", overwrite=True)  # one folder per loop
                reloaded = AutoModelForCausalLM.from_pretrained(tmp / "fp32", dtype=torch.float32)
                with torch.no_grad():
                    record["round_trip_max_abs_logit_diff"] = float((reloaded(ids).logits - expected).abs().max())
                record["packed_layers"] = sum(isinstance(m, PackedLinear) for m in reloaded.modules())
                del model, reloaded
            # sizes in fp16: compress the fp16 model (scales and float values then live in fp16)
            model, _ = load_model_and_tokenizer(default_model_path())
            model = model.half()
            if steps:
                compress_(model, Recipe(steps), progress=False)
            folder = tmp / "fp16"
            hcp.save_pretrained(model, folder, overwrite=True)
            record["disk_bytes"] = _file_bytes(folder)
            record["disk_linear_bytes"] = _header_bytes(folder, _is_block_linear_tensor)
            seconds = []
            for _ in range(args.loads):
                start = time.perf_counter()
                loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
                seconds.append(time.perf_counter() - start)
            record["load_seconds_median"] = statistics.median(seconds)
            record["resident_linear_bytes"], record["resident_bytes"] = _resident(loaded)
            records.append(record)
            print(f"{name}: disk {record['disk_bytes'] / 1e6:.1f} MB, linears {record['disk_linear_bytes'] / 1e6:.1f} MB"
                  + (f", round trip max |dlogit| {record['round_trip_max_abs_logit_diff']:.2e}" if steps else ""), flush=True)
            del model, loaded
    return records


def write(records: list[dict], args, machine: dict) -> Path:
    dense = next(r for r in records if not r["recipe"])
    header = ["setting", "linears on disk MB", "vs fp16", "linears resident MB", "vs fp16", "checkpoint MB", "vs fp16",
              "model resident MB", "vs fp16", "load s", "round trip max abs logit diff"]
    rows = []
    for r in records:
        rows.append([
            r["setting"],
            f"{r['disk_linear_bytes'] / 1e6:.1f}", f"{r['disk_linear_bytes'] / dense['disk_linear_bytes']:.3f}x",
            f"{r['resident_linear_bytes'] / 1e6:.1f}", f"{r['resident_linear_bytes'] / dense['resident_linear_bytes']:.3f}x",
            f"{r['disk_bytes'] / 1e6:.1f}", f"{r['disk_bytes'] / dense['disk_bytes']:.3f}x",
            f"{r['resident_bytes'] / 1e6:.1f}", f"{r['resident_bytes'] / dense['resident_bytes']:.3f}x",
            f"{r['load_seconds_median']:.2f}",
            f"{r['round_trip_max_abs_logit_diff']:.1e}" if "round_trip_max_abs_logit_diff" in r else "-",
        ])
    notes = (
        "'Linears' are the 210 decoder-block projections (q/k/v/o, gate/up/down), the part the formats compress: "
        "their tensors' bytes in the fp16 safetensors (from the header) and in memory after "
        "`AutoModelForCausalLM.from_pretrained(dtype=float16)`. Checkpoint and model totals include the tied "
        "49152 x 576 embedding (56.6 MB in fp16, kept 16-bit, counted once) and the norms; the embedding is "
        "why whole-model ratios stay far above the linear ones. 'Resident' counts the bytes of the loaded tensors "
        "(not process RSS, which adds the Python and torch runtime). Scales and float values are stored in the model "
        "dtype (fp16 here), zero points as uint8 per group. Round trip: the fp32 packed model in memory vs the "
        f"same model saved and reloaded, on {args.tokens} WikiText-2 test tokens. Load time: median of {args.loads} "
        f"loads from the page cache, {args.threads} threads."
    )
    settings = {"settings": args.settings, "tokens": args.tokens, "loads": args.loads, "threads": args.threads,
                "methods": "RTN for quantized settings, magnitude for sparse ones (sizes depend only on the format)"}
    return write_results("compressed_size", title="Packed checkpoint size on SmolLM2-135M-Instruct", settings=settings,
                         machine=machine, table=markdown_table(header, rows), records=records, notes=notes)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, threads=1)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help=any_of(SETTINGS))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--loads", type=int, default=3)
    args, machine = start_bench(parser, argv)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}")
    if "fp16 (dense)" not in args.settings:
        args.settings = ["fp16 (dense)", *args.settings]
    records = run(args)
    print(f"wrote {write(records, args, machine)}")


if __name__ == "__main__":
    main()
