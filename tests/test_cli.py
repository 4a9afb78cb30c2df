import json
import subprocess
import sys

import pytest

from hf_compress_prompt.cli import EXIT_NOT_IMPLEMENTED, EXIT_OK, EXIT_USAGE, main


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "hf_compress_prompt", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("eval", "demo", "compress", "recover", "evaluate-tasks", "push"):
        assert command in out.stdout
    assert "exit status" in out.stdout


@pytest.mark.parametrize("command", ["compress", "recover", "evaluate-tasks", "push"])
def test_planned_commands_say_so_and_exit_3(command, capsys):
    assert main([command]) == EXIT_NOT_IMPLEMENTED
    assert "not implemented yet" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["eval", "--seqlen", "many"])
    assert info.value.code == EXIT_USAGE


def test_unknown_dataset_is_one_line_and_exit_2_before_loading_a_model(capsys, tmp_path):
    # The model path does not exist: the dataset check must come first.
    assert main(["eval", "--model", str(tmp_path / "absent"), "--datasets", "wikitext3"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == "hf-compress-prompt eval: error: unknown dataset 'wikitext3'; choose one of c4, ptb, wiki_sample, wikitext2"


def test_missing_model_is_one_line_and_exit_2(capsys, tmp_path, data_dir):
    assert main(["eval", "--model", str(tmp_path / "absent"), "--datasets", "ptb"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a checkpoint folder" in err[0]


def test_eval_prints_a_table_and_writes_json(tiny_llama_dir, data_dir, tmp_path, capsys):
    from hf_compress_prompt import eval_tokens, load_model_and_tokenizer, perplexity

    out_json = tmp_path / "ppl.json"
    code = main(["eval", "--model", str(tiny_llama_dir), "--datasets", "wikitext2", "ptb", "--seqlen", "16",
                 "--no-progress", "--json", str(out_json)])
    assert code == EXIT_OK
    table = capsys.readouterr().out
    assert "wikitext2" in table and "ptb" in table and "perplexity" in table
    records = json.loads(out_json.read_text())
    model, tokenizer = load_model_and_tokenizer(tiny_llama_dir)
    expected = perplexity(model, eval_tokens("ptb", tokenizer), seqlen=16, progress=False)
    ptb = next(r for r in records if r["dataset"] == "ptb")
    assert ptb["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6) and ptb["windows"] == expected.windows
