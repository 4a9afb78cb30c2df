import pytest
import torch

from hf_compress_prompt.compressors.blocks import capture_block_inputs, find_decoder_layers, run_block, sequential_groups

EXPECTED_GROUPS = {
    "LlamaForCausalLM": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                         ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "OPTForCausalLM": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
}


def test_replaying_blocks_reproduces_the_models_hidden_states(tiny_model):
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    path, layers = find_decoder_layers(tiny_model)
    inputs = capture_block_inputs(tiny_model, layers, [ids[:2], ids[2:]])
    with torch.no_grad():
        reference = tiny_model(ids, output_hidden_states=True).hidden_states  # (embeddings, layer 0 out, ...)
    torch.testing.assert_close(torch.cat(inputs.hidden), reference[0])
    first = run_block(layers[0], inputs)
    torch.testing.assert_close(torch.cat(first), reference[1], rtol=1e-5, atol=1e-5)


def test_true_sequential_groups_follow_the_forward_pass(tiny_model):
    path, layers = find_decoder_layers(tiny_model)
    inputs = capture_block_inputs(tiny_model, layers, [torch.randint(0, 256, (1, 16))])
    assert sequential_groups(layers[0], inputs) == EXPECTED_GROUPS[type(tiny_model).__name__]
    assert path in ("model.layers", "model.decoder.layers")


def _other_families():
    from builders import build_tiny_gpt2, build_tiny_mistral, build_tiny_qwen2

    return {
        "qwen2": (build_tiny_qwen2, "model.layers"),
        "mistral": (build_tiny_mistral, "model.layers"),
        "gpt2": (build_tiny_gpt2, "transformer.h"),
    }


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gpt2"])
def test_other_families_are_discovered_and_replayed(family):
    build, expected_path = _other_families()[family]
    torch.manual_seed(0)
    model = build().eval()
    path, layers = find_decoder_layers(model)
    assert path == expected_path and len(layers) == 2
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, layers, [ids])
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(run_block(layers[0], inputs)[0], reference[1], rtol=1e-5, atol=1e-5)


def test_a_block_s_hessians_are_given_back_before_its_outputs_are_computed(tiny_model, monkeypatch):
    """compress_block holds one round's accumulators at a time and none through the pass that makes the next
    block's inputs (an 8192-wide down_proj's H is 268 MB)."""
    import gc

    from hf_compress_prompt.compressors import layerwise
    from hf_compress_prompt.methods.hessian import HessianAccumulator

    path, layers = find_decoder_layers(tiny_model)
    inputs = capture_block_inputs(tiny_model, layers, [torch.randint(0, 256, (1, 16))])
    alive, solved = [], []

    def outputs_pass(*args, **kwargs):
        alive.append(sum(type(o) is HessianAccumulator for o in gc.get_objects()))  # type(): no proxy warns
        return run_block(*args, **kwargs)

    monkeypatch.setattr(layerwise, "run_block", outputs_pass)
    layerwise.compress_block(layers[0], f"{path}.0", inputs, inputs.hidden,
                             lambda name, module, W, acc: solved.append(name))
    assert sorted(solved) == sorted(f"{path}.0.{n}" for n in layerwise.find_linear_layers(layers[0])) and alive == [0]


def test_a_rounds_statistics_pass_stops_before_its_last_group_runs(tiny_model):
    """Each statistics pass ends as its last group's first linear receives its input: in true-sequential order a
    linear runs in the passes of the rounds after its own and in the outputs pass, never in its own round's pass
    (Llama's q, k and v: 3 later rounds and the outputs pass; down_proj only the outputs pass), and every solve
    still gets an accumulator with every token."""
    from hf_compress_prompt.compressors import layerwise

    path, layers = find_decoder_layers(tiny_model)
    batches = [torch.randint(0, 256, (1, 16)), torch.randint(0, 256, (1, 16))]
    inputs = capture_block_inputs(tiny_model, layers, batches)
    groups = sequential_groups(layers[0], inputs)
    linears = layerwise.find_linear_layers(layers[0])
    calls = dict.fromkeys(linears, 0)
    for name, module in linears.items():
        module.register_forward_hook(lambda mod, args, out, name=name: calls.__setitem__(name, calls[name] + 1))
    tokens = {}
    layerwise.compress_block(layers[0], f"{path}.0", inputs, inputs.hidden,
                             lambda name, module, W, acc: tokens.__setitem__(name, acc.tokens))
    probe = 1  # compress_block's own sequential_groups pass
    assert len(groups) >= 4 and calls == {name: probe + (len(groups) - j) * len(batches)
                                          for j, group in enumerate(groups) for name in group}
    assert tokens == {f"{path}.0.{name}": 32 for name in linears}


def test_the_mmap_threshold_is_fixed_unless_the_user_set_one(monkeypatch):
    from hf_compress_prompt.compressors import layerwise

    if layerwise._libc() is None:
        pytest.skip("not glibc: no mallopt")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert layerwise.fix_mmap_threshold() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert layerwise.fix_mmap_threshold(576) is True


def test_wide_blocks_map_smaller_tensors_than_narrow_ones():
    from hf_compress_prompt.compressors.layerwise import mmap_threshold

    assert mmap_threshold(3072) == mmap_threshold(2048) == 4 << 20
    assert mmap_threshold(576) == mmap_threshold(None) == 16 << 20


@pytest.mark.parametrize("method", ["gptq", "sparsegpt"])
def test_with_a_spill_folder_only_each_h_s_last_reader_overwrites_it(tiny_model, tmp_path, method):
    """q, k and v read one H: with ``spill_dir`` only v (its last reader) may turn it into its factor (and so on for
    each group), so the block's
    weights, grids and outputs are the bytes of the run that copies every H; nothing is left in the folder."""
    import copy

    from hf_compress_prompt.compressors import layerwise
    from hf_compress_prompt.compressors.compress import gptq_linear, sparsegpt_linear
    from hf_compress_prompt.compressors.configs import GPTQConfig, SparseGPTConfig
    from hf_compress_prompt.compressors.state import CompressionState, StepReport

    path, layers = find_decoder_layers(tiny_model)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(tiny_model, layers, [ids[:2], ids[2:]])
    step = GPTQConfig(bits=4, group_size=16) if method == "gptq" else SparseGPTConfig(sparsity=0.5, bits=4,
                                                                                      group_size=16)
    make = gptq_linear if method == "gptq" else sparsegpt_linear
    runs = []
    for spill in (None, tmp_path):
        block, state = copy.deepcopy(layers[0]), CompressionState()
        readers = []

        def compress(name, module, W, acc, work=make(step, state, StepReport(method))):
            readers.append((name.rsplit(".", 1)[-1], acc.spill_dir is not None))
            work(name, module, W, acc)

        out = layerwise.compress_block(block, f"{path}.0", inputs, inputs.hidden, compress, spill_dir=spill)
        runs.append((out, block.state_dict(), {id(m): q for m, q in state.quantized.items()}, readers))
    (out, weights, _, plain), (spilled_out, spilled_weights, _, readers) = runs
    assert all(torch.equal(a, b) for a, b in zip(out, spilled_out, strict=True))
    assert all(torch.equal(weights[k], spilled_weights[k]) for k in weights)
    assert not any(spill for _, spill in plain)
    groups = EXPECTED_GROUPS[type(tiny_model).__name__]
    last = {g[-1].rsplit(".", 1)[-1] for g in groups}  # v_proj, o_proj, up_proj, down_proj for Llama
    assert sorted(name for name, spill in readers if spill) == sorted(last)
    assert list(tmp_path.iterdir()) == []


def test_solved_linears_held_as_their_grids_give_the_same_bytes_and_hold_one_value(tiny_model):
    """With ``grids``, each round's solved linears are held as their codes through the later rounds and the
    outputs' pass (their weights made again for each forward through them): the block's outputs, weights and
    grids are the bytes of the run that keeps them dense, and every weight is back on return."""
    import copy

    from hf_compress_prompt.compressors import layerwise
    from hf_compress_prompt.compressors.compress import gptq_linear
    from hf_compress_prompt.compressors.configs import GPTQConfig
    from hf_compress_prompt.compressors.state import CompressionState, StepReport

    path, layers = find_decoder_layers(tiny_model)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(tiny_model, layers, [ids[:2], ids[2:]])
    runs = []
    for held in (False, True):
        block, state = copy.deepcopy(layers[0]), CompressionState()
        linears = layerwise.find_linear_layers(block)
        stored = []  # per solve: how many other linears' weights store a single value

        def compress(name, module, W, acc, work=gptq_linear(GPTQConfig(bits=4, group_size=16), state,
                                                             StepReport("gptq"))):
            stored.append(sum(m.weight.untyped_storage().nbytes() == 4 for m in linears.values()))
            work(name, module, W, acc)

        out = layerwise.compress_block(block, f"{path}.0", inputs, inputs.hidden, compress,
                                       grids=state.quantized.get if held else None)
        assert all(m.weight.is_contiguous() and m.weight.untyped_storage().nbytes() == m.weight.numel() * 4
                   for m in linears.values())  # every weight back, whole
        runs.append((out, block.state_dict(), stored))
    (out, weights, dense), (held_out, held_weights, stored) = runs
    assert all(torch.equal(a, b) for a, b in zip(out, held_out, strict=True))
    assert all(torch.equal(weights[k], held_weights[k]) for k in weights)
    groups = EXPECTED_GROUPS[type(tiny_model).__name__]
    before = [sum(len(g) for g in groups[:k]) for k, g in enumerate(groups) for _ in g]  # solved in earlier rounds
    assert dense == [0] * len(before) and stored == before


def test_a_weight_that_is_not_its_grid_s_values_is_not_held():
    from hf_compress_prompt.compressors.layerwise import held_as_grids
    from hf_compress_prompt.methods.rtn import rtn_quantize

    linear = torch.nn.Linear(32, 8)
    grid = rtn_quantize(linear.weight.data, 4, 16)
    with held_as_grids() as held:
        assert not held.hold(linear, grid)  # not rounded yet
        linear.weight.data = grid.dequantize()
        assert held.hold(linear, grid) and linear.weight.untyped_storage().nbytes() == 4
        x = torch.randn(3, 32)
        assert torch.equal(linear(x), torch.nn.functional.linear(x, grid.dequantize(), linear.bias))
        assert linear.weight.untyped_storage().nbytes() == 4  # freed again after the forward pass
    assert torch.equal(linear.weight, grid.dequantize())
