"""The command line cannot drift from the configs: every field of every config a command builds has an option there,
and the command's defaults are the config's own."""

import dataclasses

import pytest

from hf_compress_prompt.cli import _config_values, _recipe_from_args, build_parser
from hf_compress_prompt.compressors import CalibrationConfig, LayerDropConfig
from hf_compress_prompt.compressors.compresso import CompressoConfig
from hf_compress_prompt.compressors.configs import step_types
from hf_compress_prompt.recovery.train import RecoveryConfig

# the arguments a method needs beyond its defaults (layer_drop needs one of num_layers / fraction / layers)
_REQUIRED = {"layer_drop": (["--num-layers", "1"], {"num_layers": 1})}


def _subparser(command: str):
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return parser, commands.choices[command]


def _flags(subparser) -> set[str]:
    return {flag for action in subparser._actions for flag in action.option_strings}


def test_method_choices_are_the_registered_steps():
    _, compress = _subparser("compress")
    method = next(a for a in compress._actions if a.dest == "method")
    assert method.choices == list(step_types())


@pytest.mark.parametrize("method", sorted(step_types()))
def test_every_step_field_is_a_compress_option_with_the_configs_default(method):
    parser, compress = _subparser("compress")
    cls = step_types()[method]
    fields = [f.name for f in dataclasses.fields(cls)]
    dests = {a.dest for a in compress._actions}
    assert set(fields) <= dests, f"fields without an option: {set(fields) - dests}"
    extra_argv, extra_kwargs = _REQUIRED.get(method, ([], {}))
    args = parser.parse_args(["compress", "--method", method, "--output", "x", *extra_argv])
    recipe = _recipe_from_args(args)
    assert recipe.steps == [cls(**extra_kwargs)]
    assert recipe.calibration == CalibrationConfig()


def test_every_calibration_field_is_a_compress_option():
    _, compress = _subparser("compress")
    for f in dataclasses.fields(CalibrationConfig):
        assert "--" + f.name.replace("_", "-") in _flags(compress)


@pytest.mark.parametrize("command, cls, argv, options", [
    ("recover", RecoveryConfig, ["--output", "x"], "_recovery_options"),
    ("prune-structured", CompressoConfig, ["--output", "x", "--target", "0.2"], "_compresso_options"),
])
def test_recover_and_compresso_options_build_the_configs_defaults(command, cls, argv, options):
    from hf_compress_prompt import cli

    parser, sub = _subparser(command)
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in dataclasses.fields(cls)} <= dests
    args = parser.parse_args([command, *argv])
    values = _config_values(args, getattr(cli, options)())
    expected = cls(target=0.2) if cls is CompressoConfig else cls()
    assert cls(**values) == expected


def test_help_shows_each_methods_own_default():
    _, compress = _subparser("compress")
    help_of = {a.dest: a.help for a in compress._actions}
    assert "gptq, sparsegpt: True; wanda: False" in help_of["true_sequential"]
    assert "gptq, rtn: 4; sparsegpt: none" in help_of["bits"]


def test_given_settings_reach_the_step():
    parser, _ = _subparser("compress")
    args = parser.parse_args(["compress", "--method", "layer_drop", "--layers", "1,3", "--score", "block_influence",
                              "--output", "x", "--nsamples", "8"])
    recipe = _recipe_from_args(args)
    assert recipe.steps == [LayerDropConfig(layers=[1, 3], score="block_influence")]
    assert recipe.calibration == CalibrationConfig(nsamples=8)
    args = parser.parse_args(["compress", "--method", "gptq", "--no-true-sequential", "--no-act-order", "--output", "x"])
    step = _recipe_from_args(args).steps[0]
    assert step.true_sequential is False and step.act_order is False
