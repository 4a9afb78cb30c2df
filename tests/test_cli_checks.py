"""Every argument check runs before any model work: a bad value fails at once with one line and exit status 2."""

import pytest

from hf_compress_prompt.cli import EXIT_USAGE, main


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading a model (or the embedded default) is an error here: a check that ran after it would be seen."""
    import hf_compress_prompt.demo
    import hf_compress_prompt.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(hf_compress_prompt.models, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr(hf_compress_prompt.demo, "load_model_and_tokenizer", refuse)


BAD = [
    (["demo", "--steps", "0"], "--steps: 0 must be >= 1"),
    (["demo", "--recipe", "rtn-w4-g64", "--steps", "-3"], "--steps: -3 must be >= 1"),
    (["demo", "--lr", "nan"], "--lr: 'nan' is not a finite number"),
    (["demo", "--lr=-1e-3"], "--lr: '-1e-3' must be > 0"),
    (["demo", "--recipe", "gptq-w5"], "recipe 'gptq-w5': choose one of"),
    (["demo", "--windows", "0"], "--windows: 0 must be >= 1"),
    (["recover", "--lr", "inf", "--output", "x"], "--lr: 'inf' is not a finite number"),
    (["recover", "--steps", "0", "--output", "x"], "max_steps=0: training needs at least one step"),
    (["recover", "--dataset", "generated", "--output", "x"], "--dataset generated trains on text the dense model"),
    (["recover", "--generator", "default", "--output", "x"], "--generator writes the training text of --dataset"),
    (["recover", "--dataset", "generated", "--generator", "default", "--generate-kind", "chat", "--output", "x"],
     "--generate-kind chat needs --questions FILE"),
    (["recover", "--dataset", "generated", "--generator", "default", "--questions", "absent.txt", "--output", "x"],
     "--questions absent.txt: cannot read it"),
    (["recover", "--generate-kind", "poems", "--output", "x"], "generate_kind='poems'"),
    (["eval", "--threads", "-1"], "--threads: -1 must be >= 1"),
    (["eval", "--threads", "0"], "--threads: 0 must be >= 1"),
    (["demo", "--threads", "two"], "--threads: 'two' is not an integer"),
    (["prune-structured", "--target", "nan", "--output", "x"], "--target: 'nan' is not a finite number"),
    (["compress", "--method", "gptq", "--nsamples", "0", "--output", "x"], "--nsamples: 0 must be >= 1"),
    (["compress", "--method", "rtn", "--resume", "--output", "x"], "--resume continues a streaming run"),
]


@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_fail_at_once_with_one_line(argv, expected, no_model_work, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own checks
        code = exit_.code
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("name", ["out/does-not-exist", "./missing", "a/b/c", "~/surely-not-here-hcp"])
def test_a_local_looking_model_path_that_does_not_exist_fails_without_the_hub(name, tmp_path, monkeypatch, capsys):
    import transformers

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # "out/does-not-exist": its parent folder exists, so it is a path, not a Hub id

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub (AutoConfig.from_pretrained) was tried for a local path")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    assert main(["eval", "--model", name, "--datasets", "wiki_sample"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "local path that does not exist" in err[0] and name in err[0]


def test_a_hub_id_is_not_mistaken_for_a_path(tmp_path, monkeypatch):
    from hf_compress_prompt.models.loading import resolve_model_source

    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_a_hub_id_fails_at_once_when_the_hub_is_unreachable_and_nothing_is_cached(tmp_path, monkeypatch, capsys):
    import transformers

    monkeypatch.chdir(tmp_path)  # "out/does-not-exist" with no out/ here: it may be a Hub id

    def no_retries(*args, **kwargs):
        raise AssertionError("transformers was asked to reach the Hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_retries)
    assert main(["eval", "--model", "out/does-not-exist", "--datasets", "wiki_sample"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the Hub is unreachable" in err[0] and "HF_HUB_OFFLINE" in err[0]
