import json

import pytest

from hf_compress_prompt.compressors import (
    CalibrationConfig,
    GPTQConfig,
    LayerDropConfig,
    Recipe,
    SparseGPTConfig,
    WandaConfig,
    step_from_dict,
)
from hf_compress_prompt.errors import UserInputError

STEPS = [
    GPTQConfig(bits=3, group_size=64, act_order=True),
    SparseGPTConfig(sparsity="2:4", bits=4, group_size=64),
    WandaConfig(sparsity=0.5),
    LayerDropConfig(fraction=0.2, score="block_influence"),
    LayerDropConfig(layers=[3, 7]),
]


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.method)
def test_steps_round_trip_through_json_unchanged(step):
    assert step_from_dict(json.loads(json.dumps(step.to_dict()))) == step


def test_recipes_round_trip_through_json_and_yaml(tmp_path):
    recipe = Recipe([SparseGPTConfig(sparsity=0.5), GPTQConfig(bits=4, group_size=64)], CalibrationConfig(nsamples=16))
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_dict()))
    (tmp_path / "r.yaml").write_text(
        "steps:\n  - {method: sparsegpt, sparsity: 0.5}\n  - {method: gptq, bits: 4, group_size: 64}\n"
        "calibration: {nsamples: 16}\n"
    )
    assert Recipe.from_file(tmp_path / "r.json") == recipe == Recipe.from_file(tmp_path / "r.yaml")


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"method": "gptq", "bitz": 4}, r"unknown keys \['bitz'\] for method 'gptq'; known keys: act_order, bits"),
        ({"method": "awq"}, r"unknown compression method 'awq'; choose one of gptq, layer_drop, magnitude, rtn, sparsegpt, wanda"),
        ({"bits": 4}, r"must be an object with a 'method' key"),
        ({"method": "gptq", "bits": 5}, r"bits=5 is not supported"),
        ({"method": "gptq", "group_size": 0}, r"group_size=0 must be a positive integer or -1"),
        ({"method": "sparsegpt", "sparsity": 1.0}, r"sparsity=1.0 is outside \(0, 1\)"),
        ({"method": "wanda", "sparsity": "3:2"}, r"needs 0 < N < M"),
        ({"method": "layer_drop"}, r"exactly one of num_layers, fraction or layers"),
        ({"method": "layer_drop", "num_layers": 2, "layers": [1]}, r"exactly one of"),
        ({"method": "layer_drop", "layers": [1, 1]}, r"distinct indices"),
        ({"method": "layer_drop", "fraction": 0.2, "score": "cosine"}, r"score='cosine'"),
    ],
)
def test_bad_steps_are_one_line_errors(data, pattern):
    with pytest.raises(UserInputError, match=pattern) as info:
        step_from_dict(data)
    assert "\n" not in str(info.value)


def test_bad_recipes_and_calibration():
    with pytest.raises(UserInputError, match="at least one step"):
        Recipe([])
    with pytest.raises(UserInputError, match="may quantize only once"):
        Recipe([GPTQConfig(), SparseGPTConfig(bits=4)])
    with pytest.raises(UserInputError, match=r"unknown recipe keys \['step'\]"):
        Recipe.from_dict({"step": []})
    with pytest.raises(UserInputError, match=r"unknown calibration keys \['samples'\]"):
        Recipe.from_dict({"steps": [{"method": "rtn"}], "calibration": {"samples": 3}})
    with pytest.raises(UserInputError, match=r"unknown dataset 'c5'"):
        CalibrationConfig(dataset="c5")
    with pytest.raises(UserInputError, match=r"calibration nsamples=0 must be a positive integer"):
        CalibrationConfig(nsamples=0)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        Recipe.from_file(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserInputError, match=r"cannot be parsed \(JSONDecodeError"):
        Recipe.from_file(tmp_path / "bad.json")
