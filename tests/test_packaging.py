"""The built wheel carries everything the package reads from its own folder at run time (card templates, C kernel
sources, lm-eval task configs), and a card renders from the installed files alone."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(out), str(ROOT)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"pip wheel failed: {build.stderr[-2000:]}")
    (path,) = out.glob("hf_compress_prompt-*.whl")
    return path


def test_the_wheel_holds_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in ("compressed_model.md", "recovery_prompt.md"):
        assert f"hf_compress_prompt/hub_cards/{template}" in names
    assert any(n.startswith("hf_compress_prompt/kernels/cpu/") and n.endswith(".c") for n in names)
    assert any(n.startswith("hf_compress_prompt/integrations/lm_eval_tasks/") and n.endswith(".yaml") for n in names)


def test_a_card_renders_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what `pip install` puts in site-packages (no source tree beside it)
    script = (
        "import torch, hf_compress_prompt.integrations.hub as hub\n"
        f"assert hub.__file__.startswith({str(site)!r}), hub.__file__\n"
        "from hf_compress_prompt.recovery import RecoveryPrompt\n"
        "prompt = RecoveryPrompt(torch.zeros(3, 8), {'base_model': 'org/base', 'steps': 5})\n"
        "card = hub.recovery_prompt_card(prompt, 'user/prompt', results={'wikitext2': 30.0})\n"
        "print(str(card))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "base_model: org/base" in run.stdout and 'load_recovery_prompt("user/prompt")' in run.stdout
