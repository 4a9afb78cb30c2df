"""Packs what bench/gpu_check.sh needs on a GPU machine that reaches nothing (no Hub, no PyPI) into .gpu_carry/
(ignored by git): the default model's GGUF in two halves (it is larger than what one device call may carry), the
evaluation and training texts, and the wheels the machine's image lacks (gguf, optimum). Run it here, then make two
device calls back to back (the machine keeps ignored paths between calls while it stays warm):

    python bench/gpu_carry.py
    run(carry=[".gpu_carry/part1", ".gpu_carry/data", ".gpu_carry/whl"], command="ls -R .gpu_carry | head")
    run(carry=[".gpu_carry/part2"], command="bash bench/gpu_check.sh", timeout_s=540)

The copied texts are a transport copy of ../shared/data for that machine alone; .gpu_carry/ is ours and is replaced
whole on every run (nothing outside it is touched).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu_carry"
TEXTS = ("c4", "wikitext-2-raw/wiki.test.raw", "ptb/ptb.test.txt")  # what the recovery and kernel benches read
WHEELS = ("gguf", "optimum")  # pure-Python packages the device image lacks (its torch, transformers, peft stay)
DEVICE_PYTHON = "3.12"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-wheels", action="store_true", help="skip downloading the wheels (no PyPI here)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from hf_compress_prompt.data import data_root
    from hf_compress_prompt.models import locate_default_gguf

    gguf, data = locate_default_gguf(), Path(data_root())
    if CARRY.exists():
        shutil.rmtree(CARRY)  # ours alone (the name is in .gitignore): rebuilt whole each time
    blob = gguf.read_bytes()
    half = len(blob) // 2
    for part, chunk in (("part1", blob[:half]), ("part2", blob[half:])):
        (CARRY / part).mkdir(parents=True)
        (CARRY / part / f"{gguf.name}.{part}").write_bytes(chunk)
    (CARRY / "part1" / "SHA256").write_text(f"{hashlib.sha256(blob).hexdigest()}  {gguf.name}\n")
    for text in TEXTS:
        source = data / text
        for file in sorted(source.rglob("*")) if source.is_dir() else [source]:
            if file.is_file():
                target = CARRY / "data" / file.relative_to(data)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)  # contents only: the copy is ours to replace (the source is read-only)
    if not args.no_wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", DEVICE_PYTHON, "--implementation", "cp", "--platform", "any",
                        "-d", str(CARRY / "whl"), *WHEELS], check=True)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in CARRY.iterdir()}
    for name, size in sizes.items():
        print(f".gpu_carry/{name}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
