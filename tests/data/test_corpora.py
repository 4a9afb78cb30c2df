import gzip

import pytest

from builders import C4_DOCS, shared_data_root
from hf_compress_prompt.data import Corpus, list_corpora, load_rows, load_text, register_corpus
from hf_compress_prompt.errors import MissingResourceError, UserInputError


def test_wikitext_rows_match_the_hub_layout(data_dir):
    # The Hub's rows are the raw lines with "\n" kept, blank " \n" lines as "".
    assert load_rows("wikitext2", "test") == ["", " = Title One = \n", "", " Some text about the first thing . \n", "",
                                              " = = Part = = \n", "", " More words here . \n"]
    assert load_text("wikitext2", "test").startswith("\n\n = Title One = \n\n\n\n\n Some text")


def test_ptb_sentences_are_stripped_and_joined_with_spaces(data_dir):
    assert load_text("ptb", "test") == "no it was n't black monday but while the new york stock exchange did n't fall apart"


def test_c4_reads_gzipped_jsonl(data_dir):
    assert load_rows("c4", "train") == C4_DOCS


def test_malformed_jsonl_names_the_file_and_line(data_dir):
    with gzip.open(data_dir / "c4" / "c4-train.00000-of-01024.first1000.jsonl.gz", "wt") as f:
        f.write('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserInputError, match=r"line 2 is not a JSON object"):
        load_rows("c4", "train")


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"name": "wikitext3"}, UserInputError, r"unknown dataset 'wikitext3'; choose one of c4, ptb, wiki_sample, wikitext2"),
        ({"name": "ptb", "split": "dev"}, UserInputError, r"dataset 'ptb' has no split 'dev'; choose one of"),
        ({"name": "ptb", "source": "s3"}, UserInputError, r"unknown data source 's3'; choose one of auto, local, hub"),
    ],
)
def test_bad_names_give_one_line_errors(data_dir, kwargs, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        load_rows(**kwargs)
    assert "\n" not in str(info.value)


def test_missing_local_file_names_the_path_and_the_fix(data_dir):
    (data_dir / "ptb" / "ptb.test.txt").unlink()
    with pytest.raises(MissingResourceError) as info:
        load_rows("ptb", "test", source="local")
    message = str(info.value)
    assert str(data_dir / "ptb" / "ptb.test.txt") in message and "HF_COMPRESS_PROMPT_DATA" in message
    assert "\n" not in message


def test_auto_source_falls_back_to_the_hub_and_says_why_it_failed(data_dir):
    with pytest.raises(MissingResourceError, match=r"the Hub could not be used .*HF_HUB_OFFLINE"):
        load_rows("wikitext2", "validation")  # not in the local folder; the Hub is offline in tests


def test_env_var_that_is_not_a_folder_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_COMPRESS_PROMPT_DATA", str(tmp_path / "nope"))
    with pytest.raises(MissingResourceError, match=r"HF_COMPRESS_PROMPT_DATA=.*nope.* is not a folder"):
        load_rows("ptb", "test")


def test_explicit_data_dir_wins_over_the_environment(data_dir, tmp_path):
    other = tmp_path / "other" / "ptb"
    other.mkdir(parents=True)
    (other / "ptb.test.txt").write_text(" a b \n c \n")
    assert load_text("ptb", "test", data_dir=other.parent) == "a b c"


def test_registering_a_duplicate_name_fails_loudly():
    with pytest.raises(ValueError, match="already registered"):
        register_corpus(Corpus(name="ptb", description="again", join=" "))
    with pytest.raises(TypeError):
        register_corpus({"name": "x"})
    assert "ptb" in list_corpora()


@pytest.mark.skipif(shared_data_root() is None, reason="../shared/data (or $HF_COMPRESS_PROMPT_DATA) is absent")
def test_real_shared_data_has_the_hub_row_counts(monkeypatch):
    monkeypatch.setenv("HF_COMPRESS_PROMPT_DATA", str(shared_data_root()))
    wikitext = load_rows("wikitext2", "test")
    assert len(wikitext) == 4358  # rows of the Hub's wikitext-2-raw-v1 test split
    assert wikitext[:3] == ["", " = Robert Boulter = \n", ""]
    assert len(load_rows("ptb", "test")) == 3761  # rows of ptb_text_only's test split
    assert len(load_rows("c4", "train")) == 1000


def test_wiki_sample_splits_are_disjoint_clean_text():
    pytest.importorskip("gensim", reason="the wiki_sample corpus ships inside gensim")
    train, test = load_rows("wiki_sample", "train"), load_rows("wiki_sample", "test")
    assert len(train) > 5 * len(test) > 0
    assert not set(train) & set(test)
    text = "\n".join(train + test)
    assert "[[" not in text and "{{" not in text and "'''" not in text
    assert sum(map(len, test)) > 100_000  # enough held-out text for several 2048-token windows


# --- the offline fallback for training and calibration text -------------------------------------------------


@pytest.fixture
def empty_data_dir(tmp_path, monkeypatch):
    """No local data (an empty $HF_COMPRESS_PROMPT_DATA) and no Hub (the autouse fixture): a fresh offline machine."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HF_COMPRESS_PROMPT_DATA", str(empty))
    return empty


def test_training_corpus_is_the_asked_one_when_it_is_there(data_dir, capsys):
    from hf_compress_prompt.data import training_corpus

    assert training_corpus("c4") == ("c4", "train")
    assert capsys.readouterr().err == ""


def test_training_corpus_falls_back_to_the_shipped_sample_offline_and_says_so_once(empty_data_dir, capsys):
    pytest.importorskip("gensim", reason="the wiki_sample corpus ships inside gensim")
    from hf_compress_prompt.data import training_corpus

    assert training_corpus("c4") == ("wiki_sample", "train")  # never its test part, which evaluation uses
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c4/train is not available" in err[0] and "wiki_sample/train" in err[0]
    assert "HF_HUB_OFFLINE" in err[0] and str(empty_data_dir) in err[0]


@pytest.mark.parametrize("name, split, source", [("c4", "train", "local"), ("wikitext2", "test", "auto"),
                                                 ("ptb", "validation", "auto")])
def test_no_fallback_for_evaluation_text_or_a_forced_source(empty_data_dir, name, split, source):
    from hf_compress_prompt.data import training_corpus

    assert training_corpus(name, split, source=source) == (name, split)  # only C4 falls back, and only on "auto"
    with pytest.raises(MissingResourceError):
        load_rows(name, split, source=source)  # reading it still fails with the full reason


def test_calibration_offline_uses_the_sample_and_records_it(empty_data_dir, byte_tokenizer):
    pytest.importorskip("gensim", reason="the wiki_sample corpus ships inside gensim")
    from builders import build_tiny_llama

    from hf_compress_prompt.compressors import CalibrationConfig, GPTQConfig, Recipe, compress_

    model = build_tiny_llama()
    result = compress_(model, Recipe([GPTQConfig(bits=4, group_size=32)], CalibrationConfig(nsamples=2, seqlen=64)),
                       tokenizer=byte_tokenizer, progress=False)
    assert result.recipe.calibration.dataset == "wiki_sample" and result.recipe.calibration.split == "train"
    assert model.config.compression_recipe["calibration"]["dataset"] == "wiki_sample"  # config.json says what ran


def test_token_windows_and_calibration_batches_fall_back_offline_too(empty_data_dir, byte_tokenizer, capsys):
    """The public data functions users call directly (examples/own_trainer.py) follow the same rule."""
    pytest.importorskip("gensim", reason="the wiki_sample corpus ships inside gensim")
    import torch

    from hf_compress_prompt.data import calibration_batches
    from hf_compress_prompt.recovery.data import token_windows

    windows = token_windows("c4", byte_tokenizer, 64, part="valid", max_windows=3)
    assert torch.equal(windows, token_windows("wiki_sample", byte_tokenizer, 64, part="valid", max_windows=3))
    batches = calibration_batches("c4", byte_tokenizer, 2, 64)
    assert torch.equal(batches, calibration_batches("wiki_sample", byte_tokenizer, 2, 64))
    assert capsys.readouterr().err.count("c4/train is not available") == 2  # once per call that fell back
