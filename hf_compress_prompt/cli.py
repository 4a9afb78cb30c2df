"""The ``hf-compress-prompt`` command line.

Exit status: 0 success; 2 bad input or usage (one line on stderr naming the value and the fix);
1 an unexpected internal error (with its traceback); 130 interrupted.

The options of ``compress`` (per method and calibration), ``recover`` and ``prune-structured --method compresso``
are generated from the config dataclasses (:class:`~hf_compress_prompt.compressors.GPTQConfig` and friends,
``CalibrationConfig``, ``RecoveryConfig``, ``CompressoConfig``): one option per field, its help the field's
``metadata["help"]``, its default the field's own, so the command line and the Python API cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from .errors import UserInputError

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_EPILOG = """\
exit status: 0 success, 2 bad input (one line naming the value and the fix), 1 internal error, 130 interrupted.
models: omit --model (or pass "default") for the embedded SmolLM2-135M-Instruct; a .gguf file, a checkpoint
folder or a Hub id also work.
data: local copies are read from $HF_COMPRESS_PROMPT_DATA (default ../shared/data beside the checkout), the Hub
otherwise; 'wiki_sample' ships with gensim and needs neither."""


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one line naming the value and the fix, exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass a whole number") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 (e.g. 3e-2)")
    return value


# ----- options generated from the config dataclasses ------------------------------------------------------------------
# Each field of a config becomes one option (``group_size`` -> ``--group-size``) whose help is the field's
# ``metadata["help"]`` and whose default is the field's own: the option's parsed default is None ("not given"), so the
# config's default applies and the CLI cannot drift from the API.


@dataclass(frozen=True)
class _ConfigOption:
    dest: str  # the field's name
    flags: tuple[str, ...]
    kind: str  # bool, int, float, fraction_or_pattern, int_list, enum, str
    help: str
    defaults: dict[str, object]  # owner (method name or config) -> the field's default there
    positive: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False  # an optional field with a non-None default: --no-<flag> sets it to None


def _kind(hint) -> tuple[str, tuple[str, ...] | None, bool]:
    """The option kind of a field's type, its choices (enums) and whether None is allowed."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    members = set(args) if args else {hint}
    optional = type(None) in members
    members.discard(type(None))
    if members == {bool}:
        return "bool", None, optional
    if members == {int}:
        return "int", None, optional
    if members == {float}:
        return "float", None, optional
    if members == {float, str}:
        return "fraction_or_pattern", None, optional
    if members == {str}:
        return "str", None, optional
    if len(members) == 1:
        (only,) = members
        if isinstance(only, type) and issubclass(only, enum.Enum):
            return "enum", tuple(str(m.value) for m in only), optional
        if typing.get_origin(only) is list and typing.get_args(only) == (int,):
            return "int_list", None, optional
    raise TypeError(f"no command-line option kind for a field of type {hint!r}; add one to cli._kind")


def _config_options(configs: dict[str, type], *,
                    aliases: dict[str, tuple[str, ...]] | None = None) -> list[_ConfigOption]:
    """One option per field name over ``configs`` (owner name -> dataclass), in declaration order; a field that
    several configs declare is one option, its default shown per owner. ``aliases`` replace a field's flag (the
    commands' established names: ``--steps`` for ``max_steps``)."""
    aliases = aliases or {}
    found: dict[str, dict] = {}
    for owner, cls in configs.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, choices, optional = _kind(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            entry = found.setdefault(f.name, {"kind": kind, "help": f.metadata.get("help", ""), "defaults": {},
                                              "positive": bool(f.metadata.get("positive")),
                                              "choices": f.metadata.get("choices", choices), "nullable": False})
            if entry["kind"] != kind:
                raise TypeError(f"field {f.name!r} has kind {entry['kind']} in one config and {kind} in {owner}")
            entry["defaults"][owner] = default
            entry["nullable"] |= optional and default is not None
    return [
        _ConfigOption(name, aliases.get(name) or ("--" + name.replace("_", "-"),), e["kind"], e["help"],
                      e["defaults"], e["positive"], tuple(e["choices"]) if e["choices"] else None, e["nullable"])
        for name, e in found.items()
    ]


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:37] + "...")
    return str(value)


def _option_help(option: _ConfigOption, owners_named: bool) -> str:
    if not owners_named:
        (default,) = option.defaults.values()
        text = f"{option.help} (default: {_shown(default)})"
    else:
        by_value: dict[str, list[str]] = {}
        for owner, default in option.defaults.items():
            by_value.setdefault(_shown(default), []).append(owner)
        shown = "; ".join(f"{', '.join(owners)}: {value}" for value, owners in by_value.items())
        text = f"{option.help} [{shown}]"
    return text.replace("%", "%%")


def _add_config_options(group, options: list[_ConfigOption], *, owners_named: bool = False,
                        required: tuple[str, ...] = ()) -> None:
    converters = {"int": _integer, "float": _finite_float}
    for option in options:
        kwargs = {"dest": option.dest, "default": None, "help": _option_help(option, owners_named)}
        if option.dest in required:
            kwargs.update(required=True, help=option.help.replace("%", "%%"))
        if option.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _positive_int if option.positive else converters.get(option.kind, str)
            if option.choices:
                kwargs["choices"] = list(option.choices)
            kwargs["metavar"] = option.dest.upper() if not option.choices else "{" + ",".join(option.choices) + "}"
        group.add_argument(*option.flags, **kwargs)
        if option.nullable:
            group.add_argument(f"--no-{option.dest.replace('_', '-')}", dest=f"no_{option.dest}", action="store_true",
                               help=f"set {option.dest} to none")


def _config_values(args: argparse.Namespace, options: list[_ConfigOption]) -> dict[str, object]:
    """The options given on the command line, as the config fields' values (text values converted and checked
    here, so an error names the flag)."""
    from .validation import parse_sparsity

    values = {}
    for option in options:
        if getattr(args, f"no_{option.dest}", False):
            values[option.dest] = None
        value = getattr(args, option.dest)
        if value is None:
            continue
        flag = option.flags[-1]
        if option.kind == "fraction_or_pattern":
            value = parse_sparsity(value, label=f"{flag} {value!r}").value
        elif option.kind == "int_list":
            try:
                value = [int(i) for i in value.split(",")]
            except ValueError:
                raise UserInputError(f"{flag} {value!r} must be comma-separated integers, e.g. 3,4,5") from None
        values[option.dest] = value
    return values


def _step_options() -> list[_ConfigOption]:
    from .compressors.configs import CalibrationConfig, step_types

    steps = step_types()
    shared = {f.name for f in dataclasses.fields(CalibrationConfig)}
    for method, cls in steps.items():
        clash = sorted(shared & {f.name for f in dataclasses.fields(cls)})
        if clash:  # compress offers both as --<name>: one would silently shadow the other
            raise TypeError(f"compression method {method!r} ({cls.__name__}) has fields {clash} that CalibrationConfig "
                            "also has; rename them (e.g. mask_seed)")
    return _config_options(steps)


def _calibration_options() -> list[_ConfigOption]:
    from .compressors.configs import CalibrationConfig

    return _config_options({"calibration": CalibrationConfig})


_RECOVERY_ALIASES = {"max_steps": ("--steps",), "num_virtual_tokens": ("--tokens",), "learning_rate": ("--lr",)}
_COMPRESSO_ALIASES = {"max_steps": ("--steps",)}


def _recovery_options() -> list[_ConfigOption]:
    from .recovery.train import RecoveryConfig

    return _config_options({"recover": RecoveryConfig}, aliases=_RECOVERY_ALIASES)


def _compresso_options() -> list[_ConfigOption]:
    from .compressors.compresso import CompressoConfig

    return _config_options({"compresso": CompressoConfig}, aliases=_COMPRESSO_ALIASES)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model: omit for the embedded SmolLM2-135M-Instruct; a .gguf file, folder or Hub id")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a model saved in --output before (the new folder "
                   "replaces it whole); a folder holding other files is refused either way")


def _add_ppl_args(p: argparse.ArgumentParser, windows_default: int | None) -> None:
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="window length in tokens (default: 2048)")
    p.add_argument(
        "--windows", type=_positive_int, default=windows_default,
        help=f"score only the first N windows (default: {'all' if windows_default is None else windows_default})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .compressors.configs import step_types
    from .compressors.presets import list_presets
    from .compressors.structured import CRITERIA
    from .data import list_corpora
    from .demo import DEMO_RECIPE

    parser = _Parser(
        prog="hf-compress-prompt",
        description="Compress a causal LM and recover its quality with a learned soft prompt.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    ev = commands.add_parser(
        "eval", help="perplexity of a model on standard test sets",
        description="Perplexity as GPTQ/SparseGPT/Wanda measure it: the split joined, tokenized once, "
        "non-overlapping windows of --seqlen tokens, exp of the mean next-token NLL.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(ev)
    ev.add_argument(
        "--datasets", nargs="+", default=["wikitext2"], metavar="NAME",
        help=f"datasets to score, any of: {', '.join(list_corpora())} (default: wikitext2)",
    )
    ev.add_argument("--split", default="test", help="split to score (default: test)")
    _add_ppl_args(ev, None)
    ev.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass (default: 1)")
    ev.add_argument("--bf16", action="store_true", help="run the forward under bf16 autocast (loss stays fp32)")
    ev.add_argument("--source", choices=["auto", "local", "hub"], default="auto", help="where data comes from (default: auto)")
    ev.add_argument("--data-dir", default=None, help="local data root (default: $HF_COMPRESS_PROMPT_DATA or ../shared/data)")
    ev.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the results as JSON here")

    demo = commands.add_parser(
        "demo", help="the main job on the embedded default: perplexity table and a generated line",
        description="Loads the embedded SmolLM2-135M-Instruct (converted from its GGUF once, then cached), scores "
        "WikiText-2 and PTB test (or the gensim Wikipedia sample when neither is reachable) and generates a line.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(demo)
    _add_ppl_args(demo, 4)
    demo.add_argument("--fp32", action="store_true", help="also score the dense model in fp32 (the default is bf16 autocast "
                      "where this CPU's bf16 matmuls are fast: AVX-512 or AMX; fp32 elsewhere)")
    demo.add_argument("--recipe", default=DEMO_RECIPE, metavar="PRESET",
                      help=f"a preset (default: {DEMO_RECIPE}; also e.g. sparsegpt-50%%+w4-g64, rtn-w4-g64; "
                           "`compress --help` lists them all), or none (dense model only)")
    demo.add_argument("--steps", type=_positive_int, default=40, help="prompt-training steps (default: 40)")
    demo.add_argument("--lr", type=_positive_float, default=3e-2, help="the prompt's learning rate (default: 3e-2)")
    demo.add_argument("--dataset", default="c4", choices=list_corpora(), metavar="NAME",
                      help="calibration and prompt-training corpus (default: c4; where it is unreachable, the "
                           "Wikipedia sample inside gensim, said in one line)")
    demo.add_argument("--nsamples", type=_positive_int, default=32, help="calibration windows of 512 tokens (default: 32)")
    demo.add_argument("--datasets", nargs="+", default=None, choices=list_corpora(), metavar="NAME",
                      help="evaluation sets (default: wikitext2 and ptb where reachable, else wiki_sample)")
    demo.add_argument("--output", default=None, help="also keep the packed model with its prompt in this folder")
    _add_overwrite_arg(demo)

    co = commands.add_parser(
        "compress", help="compress a model with one method or a recipe file, and save it",
        description="Runs GPTQ, RTN, SparseGPT, Wanda, magnitude (unstructured or N:M) or layer dropping layer by "
        "layer on the CPU (or GPU), then saves the packed model (safetensors; load it with "
        "hf_compress_prompt.from_pretrained or, after `import hf_compress_prompt`, AutoModelForCausalLM.from_pretrained).",
        epilog=_EPILOG + "\nexamples:\n  hf-compress-prompt compress --method gptq --bits 4 --group-size 64 --output out/gptq4\n"
        "  hf-compress-prompt compress --method sparsegpt --sparsity 2:4 --bits 4 --output out/sp24-4b\n"
        "  hf-compress-prompt compress --preset sparsegpt-50%+w4-g64 --output out/sp50-4b\n"
        "  hf-compress-prompt compress --recipe recipe.yaml --output out/recipe\n\npresets:\n"
        + "\n".join(f"  {name:<32} {text}" for name, text in list_presets().items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(co)
    co.add_argument("--output", required=True, help="folder to save the compressed model and tokenizer in")
    _add_overwrite_arg(co)
    what = co.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", help="a .json/.yaml recipe: {steps: [{method: ..., ...}], calibration: {...}}")
    what.add_argument("--method", choices=list(step_types()), help="one method, set by the method settings below")
    what.add_argument("--preset", metavar="NAME", help="a named setting (listed below), e.g. gptq-w4-g64")
    _add_config_options(co.add_argument_group(
        "method settings", "each applies to the methods in brackets, whose defaults are shown there; --method only"),
        _step_options(), owners_named=True)
    _add_config_options(co.add_argument_group("calibration", "override the recipe's or preset's calibration settings"),
                        _calibration_options())
    co.add_argument("--in-memory", action="store_true",
                    help="load the whole model and compress it in memory. Without it, a --model that is a local "
                         "folder with safetensors weights streams: one decoder block in memory at a time, the same "
                         "output byte for byte (a recipe it cannot run, e.g. layer dropping after another step, runs in "
                         "memory); the command says which ran")
    co.add_argument("--resume", action="store_true",
                    help="streaming only: continue a killed run from its last finished block (its state is in the "
                         "hidden folder .<output name>.hcp-stream beside --output); the same output as an "
                         "uninterrupted run. A torchrun job resumes with as many processes as it ran with")
    co.add_argument("--bf16-activations", action="store_true",
                    help="streaming only: keep the calibration activations between blocks in bf16 (half the memory; "
                         "each block still computes in fp32; the output then differs from the in-memory path's in "
                         "a few grid points)")
    co.add_argument("--max-activation-memory", default="4GB", metavar="SIZE",
                    help="streaming only: when the calibration activations between blocks would take more than this "
                         "(e.g. 4GB, 512MB; 'none': no limit), they are kept in memory-mapped files in the work "
                         "folder instead; the output is the same (default: %(default)s)")
    co.add_argument("--device", default="cpu",
                    help="where to compute: cpu (default) or cuda (streaming: each block on the GPU, activations in "
                         "host memory; in memory: the whole model on the GPU). Under torchrun, cuda is each "
                         "process's own GPU (LOCAL_RANK) over NCCL: torchrun --nproc_per_node <GPUs> -m "
                         "hf_compress_prompt compress --device cuda ... (gloo on the CPU)")
    co.add_argument("--no-progress", action="store_true", help="hide progress bars")

    rc = commands.add_parser(
        "recover", help="train a soft-prompt recovery adapter on a compressed model and save it with the model",
        description="Trains a PEFT prompt-tuning adapter (every weight frozen) on generic text with transformers' "
        "Trainer, keeps the best-validation prompt, and saves the model with the prompt in recovery_prompt/ "
        "(from_pretrained attaches it). --method LORA / FULL run the baselines instead.",
        epilog=_EPILOG + "\nexample:\n  hf-compress-prompt recover --model out/gptq3 --steps 60 --output out/gptq3-recovered",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(rc)
    rc.add_argument("--output", required=True, help="folder for the model with its prompt (LORA: the adapter)")
    _add_overwrite_arg(rc)
    _add_config_options(rc.add_argument_group(
        "recovery settings", "RecoveryConfig's fields (--lr: the paper's 1e-3 is for long runs; at tens to hundreds "
        "of steps 3e-2 recovers about 3x more, see docs/results/recovery_sweep.md)"), _recovery_options())
    rc.add_argument("--teacher", default=None, metavar="MODEL",
                    help="distil from this model (usually the uncompressed one; 'default' = the embedded SmolLM2): "
                         "train on the KL to its next-token distributions instead of the corpus' next tokens")
    rc.add_argument("--generator", default=None, metavar="MODEL",
                    help="with --dataset generated: the dense model that writes the training text ('default' = the "
                         "embedded SmolLM2); generated once and cached")
    rc.add_argument("--questions", default=None, metavar="FILE",
                    help="with --dataset generated --generate-kind chat: the questions it answers, one per line")
    rc.add_argument("--shared-with", nargs="+", default=None, metavar="MODEL",
                    help="other compressions of the same base model: train one prompt for all of them at once (mean "
                         "loss; one pass per model and step); it is saved with --output's model")
    rc.add_argument("--checkpoints", default=None, help="Trainer folder for resumable checkpoints (default: none)")
    rc.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --checkpoints")

    ps = commands.add_parser(
        "prune-structured", help="remove attention heads, FFN channels (and hidden dimensions) and save a pruned_llama",
        description="Structured pruning of a Llama-family model to --target fewer parameters. compresso learns which "
        "structures go (hard-concrete L0 gates trained with LoRA under a sparsity constraint, collaborative prompt "
        "attached to the result); l2 / random cut the same share of heads and channels in every layer at once. The "
        "result is saved as model_type pruned_llama (per-layer sizes), loadable with AutoModelForCausalLM after "
        "`import hf_compress_prompt`.",
        epilog=_EPILOG + "\nexample:\n  hf-compress-prompt prune-structured --method compresso --target 0.2 --steps 100 "
        "--output out/compresso20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(ps)
    ps.add_argument("--output", required=True, help="folder for the pruned model")
    _add_overwrite_arg(ps)
    ps.add_argument("--method", default="compresso", choices=["compresso", *CRITERIA], help="default: compresso")
    compresso = ps.add_argument_group("compresso settings", "CompressoConfig's fields; l2 and random read --target only")
    _add_config_options(compresso, _compresso_options(), required=("target",))
    compresso.add_argument("--no-hidden", dest="prune_hidden", action="store_false", default=None,
                           help="the same as --no-prune-hidden: keep every hidden dimension")

    tr = commands.add_parser(
        "transfer", help="perplexity of each model without and with each recovery prompt (transfer matrix)",
        description="Scores every (model, dataset) without a prompt and with every prompt; prints the matrix.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("--prompts", nargs="+", required=True, help="prompt folders (or compressed-model folders with one)")
    tr.add_argument("--models", nargs="+", required=True, help="compressed model folders")
    tr.add_argument("--datasets", nargs="+", default=["wikitext2"], help="evaluation corpora (default: wikitext2)")
    _add_ppl_args(tr, 4)
    tr.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    tr.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the cells as JSON")

    pu = commands.add_parser(
        "push", help="push a compressed model (with its recovery prompt) or a prompt alone to the Hub, with a card",
        description="Uploads in one commit with a model card rendered from hub_cards/ (HF_ENDPOINT is honoured).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pu.add_argument("repo_id", help="namespace/name on the Hub")
    which = pu.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a compressed model folder (its recovery_prompt/ goes along)")
    which.add_argument("--prompt", help="a recovery prompt folder")
    pu.add_argument("--results", default=None, help="JSON file or string: {dataset: perplexity} for the card")
    pu.add_argument("--private", action="store_true", help="create the repository private")

    ex = commands.add_parser(
        "export", help="write a compressed model as compressed-tensors (stock transformers and vLLM load it)",
        description="Writes the model's integer layers as compressed-tensors pack-quantized (sparse + int layers as "
        "plain int, their masks kept in hf_compress_prompt/), its recovery prompt in recovery_prompt/ (PEFT format) "
        "and the tokenizer. Float sparse layers and structurally pruned models are refused.",
        epilog=_EPILOG + "\nexample:\n  hf-compress-prompt export out/gptq-w4 --output out/gptq-w4-ct",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("model", help="a compressed model folder saved by this package (or a checkpoint it opens)")
    ex.add_argument("--output", required=True, help="folder to create")
    ex.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"], help="export format")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="float dtype of the scales and dense weights (default float32: exact; bfloat16 halves them)")
    ex.add_argument("--overwrite", action="store_true", default=False, help="replace an earlier export at --output")

    et = commands.add_parser(
        "evaluate-tasks", help="knowledge-intensive tasks (LLM-KICK) on several models side by side",
        description="Factoid QA, MMLU 0/5-shot, closed/open-book retrieval QA and summarization on each model; a "
        "model 'holds' a task when within --epsilon (relative) of the reference model. A saved recovery prompt is "
        "attached on load; NAME=PATH:noprompt scores the same folder without it.",
        epilog=_EPILOG + "\nexample:\n  hf-compress-prompt evaluate-tasks --models dense=default "
        "sparse=out/sp-w4:noprompt recovered=out/sp-w4 --limit 50 --output out/kick.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    et.add_argument("--models", nargs="+", default=["dense=default"], metavar="NAME=PATH[:noprompt]",
                    help="models to compare (default: dense=default, the embedded SmolLM2)")
    et.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="task names (default: all registered)")
    et.add_argument("--limit", type=_positive_int, default=None, help="first items per task (MMLU: per subject)")
    et.add_argument("--reference", default="dense", help="the model others are held against (default: dense)")
    et.add_argument("--epsilon", type=_finite_float, default=0.05, help="relative drop still counted as holding (0.05)")
    et.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per batch (default: 8)")
    et.add_argument("--fp32", action="store_true", help="no bf16 autocast (the default uses it where bf16 matmuls are "
                    "fast on the device: a GPU with bf16, a CPU with AVX-512 or AMX)")
    et.add_argument("--output", default=None, help="write the report as JSON here (input of `report`)")
    et.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    et.add_argument("--no-progress", action="store_true", help="hide progress bars")

    rp = commands.add_parser(
        "report", help="markdown + HTML report with PNG plots from task results and perplexities",
        description="Reads an evaluate-tasks JSON and/or perplexities (bench/recovery.py's JSON or "
        "{dense: {...}, settings: {name: {compressed: {...}, recovered: {...}}}}) and writes report.md, "
        "report.html, tasks.png and perplexity.png.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument("--tasks", default=None, help="evaluate-tasks JSON")
    rp.add_argument("--perplexity", default=None, help="perplexity JSON")
    rp.add_argument("--output", required=True, help="folder for the report")
    rp.add_argument("--title", default="Compressed model report")

    return parser


def _table(rows: list[list]) -> str:
    header = ["dataset", "mode", "perplexity", "windows", "tokens", "tokens/s"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def _row(dataset: str, mode: str, r) -> list:
    return [dataset, mode, f"{r.perplexity:.3f}", r.windows, r.tokens, f"{r.tokens_per_second:.0f}"]


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import eval_tokens, get_corpus
    from .evaluation import perplexity
    from .models import load_model_and_tokenizer

    for name in args.datasets:  # fail on a bad name before spending time loading the model
        if args.split not in get_corpus(name).splits:
            raise UserInputError(f"dataset {name!r} has no split {args.split!r}; choose one of {', '.join(get_corpus(name).splits)}")
    model, tokenizer = load_model_and_tokenizer(args.model)
    streams = {name: eval_tokens(name, tokenizer, args.split, source=args.source, data_dir=args.data_dir) for name in args.datasets}
    mode = "bf16" if args.bf16 else "fp32"
    rows, records = [], []
    for name, ids in streams.items():
        result = perplexity(
            model, ids, seqlen=args.seqlen, max_windows=args.windows, batch_size=args.batch_size,
            autocast_bf16=args.bf16, progress=not args.no_progress, desc=f"{name} {mode}",
        )
        rows.append(_row(name, mode, result))
        records.append({"model": args.model or "default", "dataset": name, "split": args.split, "mode": mode, **result.to_dict()})
    print(_table(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(records, indent=2) + "\n")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import default_mode, run_demo

    recipe = None if args.recipe == "none" else args.recipe
    modes = tuple(dict.fromkeys((default_mode(), "fp32") if args.fp32 else (default_mode(),)))
    result = run_demo(
        args.model, datasets=args.datasets, windows=args.windows, seqlen=args.seqlen,
        modes=modes, recipe=recipe, steps=args.steps,
        learning_rate=args.lr, dataset=args.dataset, nsamples=args.nsamples, output=args.output,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"model: {result.model} (loaded in {result.load_seconds:.1f} s)")
    print("precision: bf16 autocast" if modes[0] == "bf16" else "precision: fp32 (this CPU's bf16 matmuls have no fast "
          "path, no AVX-512 or AMX: bf16 autocast would be about 5x slower here)")
    if recipe:
        print(f"compressed: {recipe} in {result.compress_seconds:.0f} s; recovery prompt: {result.train_steps} steps "
              f"in {result.train_seconds:.0f} s; calibration and training text: {result.train_dataset}")
        print(f"prompt validation perplexity ({result.train_dataset}, held-out documents): before "
              f"{result.baseline_validation:.3f}, best {result.best_validation:.3f}")
    print(_table([_row(d, m, r) for d, m, r in result.rows]))
    print(f"\ngenerate (greedy), dense: {result.prompt!r} -> {result.completion!r}")
    if result.reloaded_completion is not None:
        where = f" (saved in {result.saved_to})" if result.saved_to else ""
        print(f"generate (greedy), packed model + prompt reloaded with from_pretrained{where}: "
              f"{result.prompt!r} -> {result.reloaded_completion!r}")
        print(f"kernels: {', '.join(result.kernels)}")
    return EXIT_OK


def _recipe_from_args(args: argparse.Namespace):
    """The recipe of ``compress``'s options: a recipe file, a preset or one method from its settings; the
    calibration options override the recipe's."""
    from .compressors import CalibrationConfig, Recipe, step_from_dict
    from .compressors.presets import preset_steps

    options = _step_options()
    step = _config_values(args, options)
    if step and not args.method:
        given = ", ".join(next(o.flags[-1] for o in options if o.dest == name) for name in step)
        raise UserInputError(f"{given}: method settings apply to --method only; with --{'recipe' if args.recipe else 'preset'} "
                             "write them in a recipe file instead")
    calibration = _config_values(args, _calibration_options())
    if args.recipe:
        recipe = Recipe.from_file(args.recipe)
    elif args.preset:
        recipe = Recipe(preset_steps(args.preset))
    else:
        recipe = Recipe([step_from_dict({"method": args.method, **step})])
    if calibration:
        recipe = Recipe(recipe.steps, CalibrationConfig(**{**dataclasses.asdict(recipe.calibration), **calibration}))
    return recipe


def _cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from .compressors import compress_
    from .compressors.distributed import compute_device, init_from_environment
    from .compressors.streaming import compress_pretrained, is_safetensors_folder, streaming_refusal
    from .integrations.checkpoints import save_pretrained
    from .models import load_model_and_tokenizer

    recipe = _recipe_from_args(args)  # bad flags fail before the model loads
    output = Path(args.output)
    stream = args.model and is_safetensors_folder(args.model) and not args.in_memory
    device = compute_device(args.device)  # a device that is not there fails before anything loads
    group = init_from_environment(device)  # under torchrun: one process of several
    if group is not None and not (stream and streaming_refusal(recipe) is None):
        raise UserInputError("torchrun runs the streaming path only: --model must be a local folder with safetensors "
                             "weights, without --in-memory, and a recipe it can stream; run one process otherwise")
    if stream and streaming_refusal(recipe):
        print(f"compressing in memory: {streaming_refusal(recipe)}")
        stream = False
    if args.resume and not stream:
        raise UserInputError("--resume continues a streaming run: --model must be a local folder with safetensors "
                             "weights, without --in-memory, and the recipe block-wise (not layer dropping)")
    if args.bf16_activations and not stream:
        raise UserInputError("--bf16-activations applies to the streaming path only: --model must be a local folder "
                             "with safetensors weights, without --in-memory")
    if stream:
        from transformers import AutoTokenizer

        say = print if group is None or group.is_main else (lambda *a, **k: None)
        say(f"streaming {args.model}: one decoder block in memory at a time"
            + ("" if group is None else f", {group.world_size} processes"))
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        result = compress_pretrained(
            args.model, output, recipe, tokenizer=tokenizer, overwrite=args.overwrite, progress=not args.no_progress,
            resume=args.resume, max_activation_memory=_size_or_none(args.max_activation_memory),
            activation_dtype=torch.bfloat16 if args.bf16_activations else None, device=device,
            extra_files=lambda r: {"compression_report.json": _compression_report(recipe, r)[1]})
        for line in _compression_summary(result):
            say(line)
        packed = json.loads((output / "config.json").read_text()).get("quantization_config") or {}
        say(f"saved to {output} ({len(packed.get('layers', {}))} packed layers, quantization_config in config.json; "
              "recipe under 'compression_recipe')")
        return EXIT_OK
    model, tokenizer = load_model_and_tokenizer(args.model, device=device)
    result = compress_(model, recipe, tokenizer=tokenizer, progress=not args.no_progress)
    report = _compression_report(recipe, result)[1]
    save_pretrained(model, output, tokenizer=tokenizer, overwrite=args.overwrite,
                    extra_files={"compression_report.json": report})
    for line in _compression_summary(result):
        print(line)
    packed = getattr(model.config, "quantization_config", None)
    what = f"{len(packed.layers)} packed layers, quantization_config in config.json" if packed else "plain transformers model"
    print(f"saved to {output} ({what}; recipe under 'compression_recipe')")
    return EXIT_OK


def _size_or_none(text: str) -> str | None:
    """``--max-activation-memory``: a size, or no limit."""
    from .compressors.activations import parse_size

    if text.lower() == "none":
        return None
    try:
        parse_size(text)
    except ValueError as err:
        raise UserInputError(f"--max-activation-memory {text!r} is not a size: give e.g. 4GB, 512MB or none") from err
    return text


def _compression_report(recipe, result) -> tuple[list[dict], str]:
    """Per step: method, seconds, linears, mean sparsity, dropped layers; and the report file's text."""
    summary = []
    for report in result.reports:
        sparsities = [v["sparsity"] for v in report.layers.values()]
        summary.append({
            "method": report.method, "seconds": round(report.seconds, 1), "linears": len(report.layers),
            "mean_sparsity": sum(sparsities) / len(sparsities) if sparsities else 0.0,
            "dropped_layers": report.dropped_layers,
        })
    return summary, json.dumps({"recipe": recipe.to_dict(), "steps": summary}, indent=2) + "\n"


def _compression_summary(result) -> list[str]:
    lines = []
    for row in _compression_report(result.recipe, result)[0]:
        extra = f", dropped layers {row['dropped_layers']}" if row["dropped_layers"] else ""
        lines.append(f"{row['method']}: {row['linears']} linear layers in {row['seconds']} s, mean sparsity "
                     f"{row['mean_sparsity']:.3f}{extra}")
    return lines


def _prompt_dir(path: str) -> Path:
    from .recovery import PROMPT_SUBFOLDER

    folder = Path(path)
    return folder / PROMPT_SUBFOLDER if (folder / PROMPT_SUBFOLDER).is_dir() else folder


def _questions(path: str) -> list[str]:
    """The non-empty lines of ``path``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserInputError(f"--questions {path}: cannot read it ({exc.strerror or exc})") from None
    questions = [line.strip() for line in lines if line.strip()]
    if not questions:
        raise UserInputError(f"--questions {path} holds no question (one per line)")
    return questions


def _cmd_recover(args: argparse.Namespace) -> int:
    from .integrations.checkpoints import save_pretrained
    from .models import load_model_and_tokenizer
    from .recovery import PROMPT_SUBFOLDER
    from .recovery.train import RecoveryConfig, recover

    config = RecoveryConfig(**_config_values(args, _recovery_options()))  # bad settings fail before the model loads
    if args.resume and not args.checkpoints:
        raise UserInputError("--resume needs --checkpoints (the folder the interrupted run wrote)")
    questions = _questions(args.questions) if args.questions else None
    if config.dataset == "generated" and not args.generator:
        raise UserInputError("--dataset generated trains on text the dense model writes: add --generator MODEL (its "
                             "folder or Hub id; 'default' = the embedded SmolLM2)")
    if args.generator and config.dataset != "generated":
        raise UserInputError(f"--generator writes the training text of --dataset generated (not {config.dataset}): "
                             "add --dataset generated or drop --generator")
    if config.dataset == "generated" and config.generate_kind == "chat" and not questions:
        raise UserInputError("--generate-kind chat needs --questions FILE (one question per line)")
    model, tokenizer = load_model_and_tokenizer(args.model)
    generator = None
    if args.generator:
        generator, _ = load_model_and_tokenizer(None if args.generator == "default" else args.generator)
    teacher = None
    if args.teacher:
        teacher, _ = load_model_and_tokenizer(None if args.teacher == "default" else args.teacher)
    partners = [load_model_and_tokenizer(path)[0] for path in args.shared_with or []]
    result = recover(model, tokenizer, config, output_dir=args.checkpoints, resume_from_checkpoint=args.resume or None,
                     teacher=teacher, shared_with=partners, generator=generator, questions=questions)
    for h in result.history:
        print(f"step {h['step']}: validation perplexity {h['perplexity']:.3f}"
              + (" (before training)" if h.get("baseline") else ""))
    print(f"before: validation perplexity {result.baseline_perplexity:.3f}; best: step {result.best_step}, "
          f"validation perplexity {result.best_perplexity:.3f}; {result.trainable_parameters} trainable parameters, "
          f"{result.seconds_per_step:.2f} s/step")
    if config.method.value == "LORA":
        from .integrations.checkpoints import atomic_directory

        with atomic_directory(args.output, overwrite=args.overwrite) as folder:
            result.trained.save_pretrained(folder)
        print(f"saved the LoRA adapter to {args.output}")
    else:
        save_pretrained(model, args.output, tokenizer, overwrite=args.overwrite)
        print(f"saved to {args.output}" + (" (recovery prompt in recovery_prompt/)" if result.prompt else ""))
        if partners:
            print(f"the prompt is shared with {', '.join(args.shared_with)}: attach it to them with "
                  f"model.load_recovery_prompt('{Path(args.output) / PROMPT_SUBFOLDER}')")
    return EXIT_OK


def _cmd_prune_structured(args: argparse.Namespace) -> int:
    from .compressors.compresso import CompressoConfig, compresso_prune
    from .compressors.structured import CRITERIA, count_parameters, prune_structured
    from .integrations.checkpoints import save_pretrained
    from .models import load_model_and_tokenizer

    if args.method == "compresso":  # bad settings fail before the model loads
        config = CompressoConfig(**_config_values(args, _compresso_options()))
    elif not 0 < args.target < 1 or args.method not in CRITERIA:
        raise UserInputError(f"--target={args.target} must lie in (0, 1)")
    model, tokenizer = load_model_and_tokenizer(args.model)
    before = count_parameters(model)
    if args.method == "compresso":
        result = compresso_prune(model, tokenizer, config)
        pruned = result.model
        print(f"trained {result.seconds:.0f} s ({result.seconds_per_step:.2f} s/step, "
              f"{result.trainable_parameters} trainable parameters)")
    else:
        pruned, _ = prune_structured(model, args.target, criterion=args.method)
    after = count_parameters(pruned)
    print(f"parameters {before:,} -> {after:,} ({1 - after / before:.1%} removed); heads per layer "
          f"{pruned.config.layer_num_attention_heads}; FFN channels per layer {pruned.config.layer_intermediate_size}; "
          f"hidden {pruned.config.hidden_size}")
    save_pretrained(pruned, args.output, tokenizer, overwrite=args.overwrite)
    print(f"saved to {args.output}")
    return EXIT_OK


def _cmd_transfer(args: argparse.Namespace) -> int:
    from . import eval_tokens
    from .models import load_model_and_tokenizer
    from .recovery import load_recovery_prompt
    from .recovery.transfer import evaluate_transfer

    prompts = {p: load_recovery_prompt(_prompt_dir(p)) for p in args.prompts}
    models, tokenizer = {}, None
    for m in args.models:
        models[m], tokenizer = load_model_and_tokenizer(m)
    datasets = {d: eval_tokens(d, tokenizer, "test") for d in args.datasets}
    matrix = evaluate_transfer(prompts, models, datasets, seqlen=args.seqlen, max_windows=args.windows)
    print(matrix.to_markdown())
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(matrix.to_records(), indent=2) + "\n")
    return EXIT_OK


def _cmd_push(args: argparse.Namespace) -> int:
    from .integrations.hub import push_compressed_model, push_recovery_prompt

    results = None
    if args.results:
        text = Path(args.results).read_text() if Path(args.results).is_file() else args.results
        try:
            results = {str(k): float(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError):
            raise UserInputError(f"--results {args.results!r} is not a JSON object of dataset -> perplexity") from None
    if args.prompt:
        from .recovery import load_recovery_prompt

        url = push_recovery_prompt(load_recovery_prompt(_prompt_dir(args.prompt)), args.repo_id, results=results,
                                   private=args.private or None)
    else:
        from .models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.model)
        url = push_compressed_model(model, args.repo_id, tokenizer, results=results, private=args.private or None)
    print(f"pushed: {url}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .integrations.export import export
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype))
    folder = export(model, args.output, args.format, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"exported ({args.format}): {folder}")
    return EXIT_OK


def _parse_models(specs: list[str]) -> dict[str, tuple[str | None, bool]]:
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserInputError(f"--models entry {spec!r} must be NAME=PATH (PATH 'default' for the embedded model)")
        if name in models:
            raise UserInputError(f"--models names must be unique; {name!r} appears twice")
        with_prompt = not path.endswith(":noprompt")
        path = path.removesuffix(":noprompt")
        models[name] = (None if path == "default" else path, with_prompt)
    return models


def _cmd_evaluate_tasks(args: argparse.Namespace) -> int:
    from .evaluation.tasks import evaluate_tasks, get_task, list_tasks
    from .models import load_model_and_tokenizer

    specs = _parse_models(args.models)
    tasks = args.tasks or list(list_tasks())
    for t in tasks:  # unknown names fail before any model loads
        get_task(t)
    reference = args.reference if args.reference in specs else None
    if args.reference != "dense" and reference is None:
        raise UserInputError(f"--reference {args.reference!r} is not one of the --models names {list(specs)}")
    models, tokenizer = {}, None
    for name, (path, with_prompt) in specs.items():
        models[name], tokenizer = load_model_and_tokenizer(path)
        if not with_prompt and hasattr(models[name], "disable_recovery_prompt"):
            models[name].disable_recovery_prompt()
    report = evaluate_tasks(models, tokenizer, tasks, limit=args.limit, reference=reference, epsilon=args.epsilon,
                            batch_size=args.batch_size, autocast_bf16=False if args.fp32 else None, progress=not args.no_progress)
    print(report.to_markdown())
    if args.output:
        print(f"saved to {report.save(args.output)}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from .evaluation.report import write_report

    written = write_report(args.output, tasks=args.tasks, perplexities=args.perplexity, title=args.title)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        from ._logging import set_verbosity

        set_verbosity(logging.INFO)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        if getattr(args, "overwrite", None) is not None and args.output:  # a refused --output fails before model work
            from .integrations.checkpoints import check_save_target

            check_save_target(args.output, args.overwrite)
        commands = {"eval": _cmd_eval, "demo": _cmd_demo, "compress": _cmd_compress, "recover": _cmd_recover,
                    "prune-structured": _cmd_prune_structured,
                    "transfer": _cmd_transfer, "push": _cmd_push, "export": _cmd_export, "evaluate-tasks": _cmd_evaluate_tasks,
                    "report": _cmd_report}
        return commands[args.command](args)
    except UserInputError as exc:
        print(f"hf-compress-prompt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RuntimeError as exc:
        from .integrations.hub import HubUploadError

        if not isinstance(exc, HubUploadError):
            raise
        print(f"hf-compress-prompt {args.command}: error: {exc}".replace("\n", " "), file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
