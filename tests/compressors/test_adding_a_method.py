"""docs/adding_a_method.md, as a test: a toy method (random pruning, the control every pruning paper needs) added the
way the page says, outside the package (one module: the maths, one config, one registry entry), then run through
``compress_``, a preset, the command line's option generator, ``save_pretrained`` and ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import (
    CompressionConfig,
    block_linears,
    compress_,
    record_pruned,
    register_compressor,
    register_preset,
)
from hf_compress_prompt.compressors.configs import check_linears, step_types
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.methods.masks import layer_prune_mask, nm_prune_mask
from hf_compress_prompt.validation import parse_sparsity


def random_prune(weight: torch.Tensor, sparsity, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The maths: prune a random ``sparsity`` of ``weight`` (out, in), or N of every M inputs. Returns the pruned
    weight and the mask (True = pruned)."""
    pattern = parse_sparsity(sparsity)
    scores = torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed))  # (out, in)
    mask = nm_prune_mask(scores, pattern.n, pattern.m) if pattern.is_nm else layer_prune_mask(scores, pattern.fraction)
    return weight.masked_fill(mask, 0), mask


@pytest.fixture(scope="module")
def toy_method():
    """Registers the toy method once (registries refuse a second definition), and removes it afterwards so the
    other tests see only the package's own methods."""
    from hf_compress_prompt.compressors import compress as compress_module
    from hf_compress_prompt.compressors import configs as configs_module
    from hf_compress_prompt.compressors import presets as presets_module

    @dataclass
    class RandomPruneConfig(CompressionConfig):
        """Random pruning: the control a pruning criterion must beat."""

        method: ClassVar[str] = "toy_random"
        needs_calibration: ClassVar[bool] = False
        sparsity: float | str = field(default=0.5, metadata={"help": "fraction in (0, 1) or N:M such as '2:4'"})
        mask_seed: int = field(default=0, metadata={"help": "seed of the random choice"})

        def __post_init__(self):
            parse_sparsity(self.sparsity)

        def validate_for(self, model):
            check_linears(self, model, sparsity=self.sparsity)

    @register_compressor(RandomPruneConfig)
    def _run_random(model, step, state, report, recipe, progress):
        for index, (name, module) in enumerate(block_linears(model)):
            weight, mask = random_prune(module.weight.data, step.sparsity, step.mask_seed + index)
            record_pruned(state, name, module, weight, mask, report)

    register_preset("toy-random-50%", [RandomPruneConfig(sparsity=0.5)], "toy: half the weights pruned at random")
    try:
        yield RandomPruneConfig
    finally:
        del configs_module._STEPS[RandomPruneConfig.method]
        del compress_module._HANDLERS[RandomPruneConfig]
        del presets_module._PRESETS["toy-random-50%"]


def test_the_toy_method_is_registered_like_the_package_methods(toy_method):
    assert step_types()["toy_random"] is toy_method
    with pytest.raises(ValueError, match="already"):
        register_compressor(toy_method)(lambda *args: None)  # one handler per config type


def test_the_toy_method_runs_through_compress_save_and_from_pretrained(toy_method, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    names = [name for name, _ in block_linears(tiny_llama)]
    result = compress_(tiny_llama, toy_method(sparsity="2:4", mask_seed=1), progress=False)  # packs: 2:4 kept values
    assert sorted(result.masks) == sorted(names)
    for name in names:
        assert float(result.masks[name].float().mean()) == 0.5
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = tiny_llama(ids).logits
    hcp.save_pretrained(tiny_llama, tmp_path / "toy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "toy")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    assert loaded.config.compression_recipe["steps"] == [{"method": "toy_random", "sparsity": "2:4", "mask_seed": 1}]


def test_the_toy_method_has_a_preset_and_checks_the_model_before_work(toy_method, tiny_llama):
    result = compress_(tiny_llama, "toy-random-50%", pack=False, progress=False)
    assert all(abs(float(m.float().mean()) - 0.5) < 1e-6 for m in result.masks.values())
    with pytest.raises(UserInputError, match="toy_random on model.layers.0"):
        compress_(tiny_llama, toy_method(sparsity="3:7"), progress=False)  # 7 does not divide the widths


def test_the_command_line_offers_the_toy_method_with_its_fields(toy_method):
    from hf_compress_prompt.cli import build_parser

    args = build_parser().parse_args(["compress", "--method", "toy_random", "--sparsity", "0.25", "--mask-seed", "3",
                                      "--output", "out/toy"])
    assert args.method == "toy_random" and args.sparsity == "0.25" and args.mask_seed == 3
    from hf_compress_prompt.cli import _recipe_from_args

    (step,) = _recipe_from_args(args).steps
    assert step == toy_method(sparsity=0.25, mask_seed=3)


def test_a_field_that_shadows_a_calibration_option_is_named():
    from hf_compress_prompt.cli import build_parser
    from hf_compress_prompt.compressors import configs as configs_module

    @dataclass
    class ClashConfig(CompressionConfig):
        method: ClassVar[str] = "toy_clash"
        seed: int = 0  # CalibrationConfig has a seed too: compress --seed would mean two things

    try:
        with pytest.raises(TypeError, match=r"'toy_clash'.*\['seed'\].*rename"):
            build_parser()
    finally:
        del configs_module._STEPS["toy_clash"]
