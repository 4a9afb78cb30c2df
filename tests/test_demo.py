import pytest

from hf_compress_prompt.demo import demo_datasets, run_demo


def test_demo_uses_the_standard_sets_when_present(data_dir):
    assert demo_datasets() == ["wikitext2", "ptb"]


def test_demo_falls_back_to_the_wikipedia_sample_offline(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HF_COMPRESS_PROMPT_DATA", str(empty))
    assert demo_datasets() == ["wiki_sample"]


def test_demo_scores_and_generates(tiny_llama_dir):
    pytest.importorskip("gensim", reason="the wiki_sample corpus ships inside gensim")
    result = run_demo(str(tiny_llama_dir), datasets=["wiki_sample"], windows=2, seqlen=32, modes=("fp32", "bf16"),
                      recipe=None, progress=False)
    assert [(d, m) for d, m, _ in result.rows] == [("wiki_sample", "fp32"), ("wiki_sample", "bf16")]
    assert all(r.windows == 2 and r.perplexity > 1 for _, _, r in result.rows)
    assert isinstance(result.completion, str) and result.completion


def test_demo_compresses_recovers_saves_reloads_and_generates(tiny_llama_dir, data_dir, tmp_path):
    result = run_demo(str(tiny_llama_dir), datasets=["wikitext2"], windows=2, seqlen=32, recipe="rtn-w4-g64",
                      steps=2, num_virtual_tokens=2, train_seqlen=4, nsamples=2, output=str(tmp_path / "out"),
                      progress=False)
    assert [label for _, label, _ in result.rows] == ["dense", "compressed", "recovered"]
    dense, compressed, recovered = (r.perplexity for _, _, r in result.rows)
    assert compressed != dense and recovered < compressed  # the prompt recovered part of what compression lost
    assert (tmp_path / "out" / "recovery_prompt" / "adapter_config.json").is_file()
    assert result.reloaded_completion is not None and result.kernels


def test_demo_command_runs_on_a_fresh_offline_machine(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The README's `make demo` path (the CLI's demo: compress with calibration, train a prompt, score, save, reload,
    generate) with no data folder and no Hub: calibration and training fall back to the Wikipedia sample's training
    part, evaluation to its held-out test part, and the fallback is said in one line."""
    pytest.importorskip("gensim", reason="the wiki_sample corpus ships inside gensim")
    from hf_compress_prompt.cli import EXIT_OK, main

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HF_COMPRESS_PROMPT_DATA", str(empty))  # HF_HUB_OFFLINE=1 comes from the autouse fixture
    code = main(["demo", "--model", str(tiny_llama_dir), "--recipe", "gptq-w3-g64", "--steps", "2", "--nsamples", "2",
                 "--windows", "2", "--seqlen", "32", "--no-progress", "--output", str(tmp_path / "out")])
    assert code == EXIT_OK
    out, err = capsys.readouterr()
    fallback = [line for line in err.splitlines() if "c4/train is not available" in line]
    assert len(fallback) == 1 and "wiki_sample/train" in fallback[0]  # said once, though used twice
    assert "calibration and training text: wiki_sample" in out
    from hf_compress_prompt.demo import default_mode

    assert f"precision: {default_mode()}" in out  # bf16 autocast only where this CPU runs it fast
    assert "prompt validation perplexity (wiki_sample, held-out documents): before" in out
    assert out.count("wiki_sample  ") >= 3  # dense, compressed and recovered rows on the held-out test part
    assert (tmp_path / "out" / "recovery_prompt" / "adapter_config.json").is_file()
    import json

    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["compression_recipe"]
    assert recipe["calibration"]["dataset"] == "wiki_sample"
