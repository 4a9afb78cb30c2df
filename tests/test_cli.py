import json
import subprocess
import sys

import pytest

from hf_compress_prompt.cli import EXIT_OK, EXIT_USAGE, main


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "hf_compress_prompt", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("eval", "demo", "compress", "recover", "transfer", "push", "export", "evaluate-tasks", "report"):
        assert command in out.stdout
    assert "exit status" in out.stdout


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


def test_compress_runs_a_method_from_flags_and_saves(tiny_llama_dir, data_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code = main(["compress", "--model", str(tiny_llama_dir), "--method", "sparsegpt", "--sparsity", "2:4", "--bits", "4",
                 "--group-size", "32", "--dataset", "c4", "--nsamples", "4", "--seqlen", "16", "--output", str(out),
                 "--no-progress"])
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert "sparsegpt: 14 linear layers" in printed and "14 packed layers" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.fmt.sparsity == "2:4" and q_proj.fmt.bits == 4  # saved packed
    q = q_proj.dequantize_weight()
    assert bool(((q != 0).reshape(-1, 4).sum(-1) <= 2).all())  # 2:4 held in the saved weights
    recipe = model.config.to_dict()["compression_recipe"]
    assert recipe["steps"][0]["sparsity"] == "2:4" and recipe["calibration"]["nsamples"] == 4
    report = json.loads((out / "compression_report.json").read_text())
    assert report["steps"][0]["mean_sparsity"] == pytest.approx(0.5)


def test_compress_runs_a_recipe_file(tiny_llama_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - {method: magnitude, sparsity: 0.5}\n  - {method: rtn, bits: 4, group_size: 32}\n")
    assert main(["compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(tmp_path / "o"),
                 "--no-progress"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "magnitude: 14 linear layers" in printed and "rtn: 14 linear layers" in printed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "gptq", "--sparsity", "0.5"], "unknown keys ['sparsity'] for method 'gptq'"),
        (["--method", "wanda", "--sparsity", "half"], "--sparsity 'half' is neither a fraction nor N:M"),
        (["--method", "layer_drop", "--layers", "1,x"], "--layers '1,x' must be comma-separated integers"),
        (["--method", "gptq", "--bits", "5"], "bits=5 is not supported"),
        (["--method", "sparsegpt", "--sparsity", "3:2"], "--sparsity '3:2' needs 0 < N < M"),
        (["--preset", "gptq-w5"], "unknown preset 'gptq-w5'; choose one of"),
        (["--preset", "gptq-w4-g64", "--bits", "3"], "--bits: method settings apply to --method only"),
    ],
)
def test_compress_rejects_bad_flags_before_loading(flags, message, tmp_path, capsys):
    code = main(["compress", "--model", str(tmp_path / "absent"), "--output", str(tmp_path / "o"), *flags])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_compress_runs_a_preset(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "preset"
    assert main(["compress", "--model", str(tiny_llama_dir), "--preset", "rtn-w4-g64", "--output", str(out),
                 "--no-progress"]) == EXIT_OK
    assert "rtn: 14 linear layers" in capsys.readouterr().out
    recipe = json.loads((out / "config.json").read_text())["compression_recipe"]
    assert recipe["steps"] == [{"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False, "lm_head": False,
                                "lm_head_bits": None}]


def test_eval_reads_a_packed_folder(tiny_llama_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "packed"
    assert main(["compress", "--model", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--output", str(out), "--no-progress"]) == EXIT_OK
    files = {p.name for p in out.iterdir()}
    # a folder push_to_hub / upload_folder can publish as is: config, weights (safetensors only), tokenizer
    assert {"config.json", "model.safetensors", "tokenizer.json", "compression_report.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert main(["eval", "--model", str(out), "--datasets", "wikitext2", "--seqlen", "16"]) == EXIT_OK
    assert "wikitext2" in capsys.readouterr().out


def test_recover_trains_saves_and_transfer_scores_it(tiny_llama_dir, data_dir, tmp_path, capsys):
    from hf_compress_prompt import from_pretrained
    from hf_compress_prompt.recovery import recovery_prompt_of

    out = tmp_path / "recovered"
    code = main(["recover", "--model", str(tiny_llama_dir), "--output", str(out), "--steps", "2", "--tokens", "2",
                 "--seqlen", "4", "--batch-size", "2", "--eval-steps", "1", "--eval-windows", "1"])
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert "step 1: validation perplexity" in printed and "best: step" in printed
    assert (out / "recovery_prompt" / "adapter_model.safetensors").is_file()
    assert recovery_prompt_of(from_pretrained(out)).num_virtual_tokens == 2
    table = tmp_path / "transfer.json"
    code = main(["transfer", "--prompts", str(out), "--models", str(tiny_llama_dir), "--datasets", "wikitext2",
                 "--seqlen", "16", "--windows", "2", "--json", str(table)])
    assert code == EXIT_OK
    cells = json.loads(table.read_text())
    assert len(cells) == 1 and cells[0]["with"] != cells[0]["without"]


def test_recover_distils_from_a_teacher(tiny_llama_dir, data_dir, tmp_path):
    from hf_compress_prompt.recovery import load_recovery_prompt

    out = tmp_path / "distilled"
    code = main(["recover", "--model", str(tiny_llama_dir), "--output", str(out), "--steps", "2", "--tokens", "2",
                 "--seqlen", "4", "--batch-size", "2", "--eval-steps", "1", "--eval-windows", "1",
                 "--teacher", str(tiny_llama_dir)])
    assert code == EXIT_OK
    metadata = load_recovery_prompt(out / "recovery_prompt").metadata
    assert metadata["loss"].startswith("KL") and metadata["teacher"]


def test_recover_trains_on_text_the_dense_model_writes(tiny_llama_dir, tmp_path, monkeypatch):
    from hf_compress_prompt.recovery import load_recovery_prompt

    monkeypatch.setenv("HF_COMPRESS_PROMPT_GENERATED_CACHE", str(tmp_path / "generated"))
    out = tmp_path / "self-taught"
    code = main(["recover", "--model", str(tiny_llama_dir), "--output", str(out), "--steps", "2", "--tokens", "2",
                 "--seqlen", "8", "--batch-size", "2", "--eval-steps", "1", "--eval-windows", "1", "--dataset",
                 "generated", "--generator", str(tiny_llama_dir), "--generate-count", "2", "--generate-tokens", "24"])
    assert code == EXIT_OK
    assert load_recovery_prompt(out / "recovery_prompt").metadata["training"]["dataset"] == "generated"
    assert len(list((tmp_path / "generated").glob("generated-*.jsonl"))) == 1


def test_recover_shares_one_prompt_between_two_models(tiny_llama_dir, data_dir, tmp_path, capsys):
    from hf_compress_prompt import from_pretrained
    from hf_compress_prompt.formats import RECIPE_CONFIG_KEY
    from hf_compress_prompt.recovery import load_recovery_prompt

    packed, out = tmp_path / "packed", tmp_path / "shared"
    assert main(["compress", "--model", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--output", str(packed), "--no-progress"]) == EXIT_OK
    code = main(["recover", "--model", str(tiny_llama_dir), "--output", str(out), "--steps", "2", "--tokens", "2",
                 "--seqlen", "4", "--batch-size", "2", "--eval-steps", "1", "--eval-windows", "1",
                 "--shared-with", str(packed)])
    assert code == EXIT_OK
    assert "load_recovery_prompt" in capsys.readouterr().out
    prompt = load_recovery_prompt(out / "recovery_prompt")
    recipe = getattr(from_pretrained(packed).config, RECIPE_CONFIG_KEY)  # the partner's recipe goes with the prompt
    assert recipe and prompt.metadata["shared_with_recipes"] == [recipe]


def test_recover_bad_settings_exit_2_before_loading(tmp_path, capsys):
    assert main(["recover", "--model", str(tmp_path / "absent"), "--output", str(tmp_path / "o"), "--steps", "0"]) == EXIT_USAGE
    assert "max_steps=0" in capsys.readouterr().err


def test_evaluate_tasks_then_report(task_data_dir, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "kick.json"
    code = main(["evaluate-tasks", "--models", f"dense={tiny_llama_dir}", f"same={tiny_llama_dir}:noprompt",
                 "--tasks", "factoid_qa", "mmlu_0shot", "--limit", "2", "--batch-size", "2", "--no-progress",
                 "--output", str(out)])
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert "| factoid_qa (accuracy, n=2) |" in printed and "(holds)" in printed  # the same weights hold every task
    saved = json.loads(out.read_text())
    assert saved["holds"] == {"same": {"factoid_qa": True, "mmlu_0shot": True}}
    ppl = tmp_path / "ppl.json"
    ppl.write_text(json.dumps({"dense": {"wikitext2": 20.0}, "settings": {
        "gptq-w3": {"compressed": {"wikitext2": 50.0}, "recovered": {"wikitext2": 40.0}}}}))
    assert main(["report", "--tasks", str(out), "--perplexity", str(ppl), "--output", str(tmp_path / "rep")]) == EXIT_OK
    for name in ("report.md", "report.html", "tasks.png", "perplexity.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    assert (tmp_path / "rep" / "tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| gptq-w3 | 50.00 | 40.00 |" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["evaluate-tasks", "--tasks", "trivia"], "unknown task 'trivia'"),
    (["evaluate-tasks", "--models", "dense"], "must be NAME=PATH"),
    (["evaluate-tasks", "--models", "a=x", "a=y"], "unique"),
    (["report", "--output", "x"], "needs task results, perplexities or both"),
])
def test_evaluate_tasks_and_report_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("method", ["l2", "compresso"])
def test_prune_structured_saves_a_loadable_pruned_llama(method, tiny_llama_dir, data_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_compress_prompt.models.pruned_llama import PrunedLlamaForCausalLM
    from hf_compress_prompt.recovery import recovery_prompt_of

    out = tmp_path / "pruned"
    code = main(["prune-structured", "--model", str(tiny_llama_dir), "--output", str(out), "--method", method,
                 "--target", "0.3", "--steps", "3", "--seqlen", "8", "--batch-size", "2", "--multiple-of", "8"])
    assert code == EXIT_OK
    assert "removed" in capsys.readouterr().out
    from hf_compress_prompt import from_pretrained

    for loaded in (AutoModelForCausalLM.from_pretrained(out), from_pretrained(out)):
        assert isinstance(loaded, PrunedLlamaForCausalLM)
        assert (recovery_prompt_of(loaded) is not None) == (method == "compresso")  # the collaborative prompt


def test_prune_structured_bad_target_exits_2_before_loading(tmp_path, capsys):
    for method in ("l2", "compresso"):
        assert main(["prune-structured", "--model", str(tmp_path / "absent"), "--output", str(tmp_path / "o"),
                     "--method", method, "--target", "1.5"]) == EXIT_USAGE
        assert "1.5" in capsys.readouterr().err


# --- --output never destroys what a user owns; --overwrite replaces an earlier save (issue 21) ---

_SAVING = {  # each command that saves a model to --output, with settings that pass its own checks
    "compress": ["compress", "--method", "rtn", "--bits", "4", "--group-size", "32", "--no-progress"],
    "recover": ["recover", "--steps", "2", "--tokens", "2", "--seqlen", "4", "--batch-size", "2"],
    "prune-structured": ["prune-structured", "--method", "l2", "--target", "0.3"],
    "demo": ["demo", "--recipe", "rtn-w4-g64", "--no-progress"],
}


@pytest.mark.parametrize("kind, message", [
    ("user-folder", "holds 'notes.txt', which no save_pretrained writes"),
    ("file", "is a file, not a folder"),
    ("current-folder", "is the current folder or holds it"),
])
@pytest.mark.parametrize("command", sorted(_SAVING))
def test_output_holding_a_users_files_is_refused_before_model_work(command, kind, message, tmp_path, monkeypatch,
                                                                   capsys):
    import os

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    monkeypatch.chdir(mine if kind == "current-folder" else tmp_path)
    output = {"user-folder": str(mine), "file": str(mine / "notes.txt"), "current-folder": "."}[kind]
    # the model does not exist: the output is checked first, in a second, not after minutes of model work
    code = main([*_SAVING[command], "--model", str(tmp_path / "absent"), "--output", output, "--overwrite"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and f"hf-compress-prompt {command}: error:" in err[0]
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_run_demo_checks_its_output_before_model_work(tmp_path):
    from hf_compress_prompt.demo import run_demo
    from hf_compress_prompt.errors import UserInputError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="holds 'notes.txt'"):
        run_demo(str(tmp_path / "absent"), recipe="rtn-w4-g64", output=str(tmp_path), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_compress_replaces_its_earlier_output_only_with_overwrite(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"

    def argv(bits):
        return ["compress", "--model", str(tiny_llama_dir), "--method", "rtn", "--bits", bits, "--group-size", "32",
                "--output", str(out), "--no-progress"]

    assert main(argv("4")) == EXIT_OK
    capsys.readouterr()
    assert main(argv("8")) == EXIT_USAGE  # refused: the 4-bit save stays
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a saved model" in err[0] and "--overwrite" in err[0]
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].self_attn.q_proj.fmt.bits == 4
    assert main([*argv("8"), "--overwrite"]) == EXIT_OK
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].self_attn.q_proj.fmt.bits == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-llama"]  # no staging folder left


def test_recover_lora_adapter_output_follows_the_same_rules(tiny_llama_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    argv = ["recover", "--model", str(tiny_llama_dir), "--output", str(out), "--method", "LORA", "--steps", "1",
            "--seqlen", "4", "--batch-size", "2", "--eval-steps", "1", "--eval-windows", "1"]
    assert main(argv) == EXIT_OK
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(argv) == EXIT_USAGE
    assert "already holds a saved model" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--overwrite"]) == EXIT_USAGE
    assert "holds 'notes.txt'" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert main([*argv, "--overwrite"]) == EXIT_OK
