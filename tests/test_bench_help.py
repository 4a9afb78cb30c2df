"""Every benchmark script parses its arguments: `--help` prints and exits 0 (argparse %-formats help texts, and
setting names such as "50% + 4-bit" once broke that)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


needs_no_gpu = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")


@needs_no_gpu
def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    results = BENCH.parent / "docs" / "results"
    before = sorted(p.name for p in results.iterdir())
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path)}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU" in proc.stdout and "skipped" in proc.stdout
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in results.iterdir()) == before  # nothing written


@needs_no_gpu
@pytest.mark.parametrize("argv", [["kernels_gpu.py"], ["recovery.py", "--device", "cuda"]], ids=" ".join)
def test_gpu_benches_refuse_in_one_line_without_a_gpu(argv):
    proc = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "GPU" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _probed_by_transformers() -> set[str]:
    """The packages transformers looks for on import (``_is_package_available("name")`` in its import_utils)."""
    import re

    import transformers.utils.import_utils as import_utils

    return set(re.findall(r'_is_package_available\(\s*"([A-Za-z0-9_]+)"', Path(import_utils.__file__).read_text()))


def test_no_script_stands_in_for_a_package():
    """A script's folder comes first on sys.path, so a bench/kernels.py is what `import kernels` finds there: with
    the `kernels` package installed (transformers >= 5.25 requires it) transformers then failed on import in every
    bench script. No script may share its name with an importable module or a package transformers probes for."""
    import importlib.util

    probed = _probed_by_transformers()
    assert "kernels" in probed  # the reading above still finds what it looks for
    for script in sorted(BENCH.glob("*.py")):
        name = script.stem
        assert name not in probed, f"bench/{script.name} would stand in for the {name!r} package"
        found = importlib.util.find_spec(name)  # the tests' sys.path does not hold bench/
        # a folder without __init__.py (origin None: a namespace package, such as tests/recovery/) yields to a module
        assert found is None or found.origin is None, f"bench/{script.name} would stand in for {found.origin}"
