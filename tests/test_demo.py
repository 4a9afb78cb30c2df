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
    result = run_demo(str(tiny_llama_dir), datasets=["wiki_sample"], windows=2, seqlen=32, modes=("fp32", "bf16"), progress=False)
    assert [(d, m) for d, m, _ in result.rows] == [("wiki_sample", "fp32"), ("wiki_sample", "bf16")]
    assert all(r.windows == 2 and r.perplexity > 1 for _, _, r in result.rows)
    assert isinstance(result.completion, str) and result.completion
