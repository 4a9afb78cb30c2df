"""``generate`` with an attached recovery prompt gives the tokens of prompt tuning by its definition in every decoding
mode: the oracle is transformers' own decoding (the same mode, the same seed) on a copy of the model that sees
``[prompt embeddings; token embeddings]`` at every step with no cache, recomputing everything. Each mode either
equals the oracle or is refused with one clear error; none may return other tokens silently."""

import copy

import pytest
import torch

from builders import build_tiny_llama
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt

N, L, NEW = 6, 10, 6


def _prompt(hidden=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RecoveryPrompt(torch.randn(N, hidden, generator=g) * 0.5, {"base_model": "tiny"})


def _oracle(model, prompt):
    """A copy of ``model`` (no runtime attached) whose every forward gets the prompt's embeddings before the tokens'
    and no cache: positions ``0..n-1`` for the prompt, the tokens' own positions shifted by ``n``, the mask extended
    with ones. Used with ``use_cache=False``, transformers recomputes the whole sequence at every step."""
    oracle = copy.deepcopy(model)

    def prepend(module, args, kwargs):
        if kwargs.get("input_ids") is None:
            return None  # _greedy_loop's forward: the prompt is in its inputs_embeds already
        assert not args and kwargs.get("cache") is None and kwargs.get("past_key_values") is None
        ids = kwargs.pop("input_ids")
        batch = len(ids)
        embeds = module.get_input_embeddings()(ids)  # (B, L, hidden)
        kwargs["inputs_embeds"] = torch.cat([prompt.embedding.to(embeds).expand(batch, -1, -1), embeds], dim=1)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"].new_ones(batch, N), kwargs["attention_mask"]], 1)
        if kwargs.get("position_ids") is not None:
            prompt_positions = torch.arange(N, device=ids.device).expand(batch, -1)
            kwargs["position_ids"] = torch.cat([prompt_positions, kwargs["position_ids"] + N], dim=1)
        return args, kwargs

    oracle.register_forward_pre_hook(prepend, with_kwargs=True)
    return oracle


def _greedy_loop(model, prompt, ids, steps):
    """Greedy decoding written out (batch without padding): argmax of a full recomputation per step."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            embeds = torch.cat([prompt.embedding.unsqueeze(0).expand(len(seq), -1, -1),
                                model.get_input_embeddings()(seq)], dim=1)
            seq = torch.cat([seq, model(inputs_embeds=embeds, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return seq


def _inputs(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "one":
        ids = torch.randint(3, 256, (1, L), generator=g)
        return ids, torch.ones_like(ids)
    a, b = torch.randint(3, 256, (1, L), generator=g), torch.randint(3, 256, (1, L - 4), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])  # (2, L), row 1 left-padded
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def _assistant():
    return build_tiny_llama(num_layers=1)


# (id, inputs, generate kwargs, what the oracle leaves out: the options that only change how the tokens are found)
CASES = [
    ("greedy", "one", {}, ()),
    ("greedy_left_padded", "padded", {}, ()),
    ("sample", "one", {"do_sample": True, "top_k": 5}, ()),
    ("sample_left_padded", "padded", {"do_sample": True, "top_k": 5}, ()),
    ("sample_return_2", "one", {"do_sample": True, "top_k": 5, "num_return_sequences": 2}, ()),
    ("beams_2", "one", {"num_beams": 2}, ()),
    ("beams_4", "one", {"num_beams": 4}, ()),
    ("beams_4_return_2", "one", {"num_beams": 4, "num_return_sequences": 2}, ()),
    ("beams_2_left_padded", "padded", {"num_beams": 2}, ()),
    ("beam_sample_2", "one", {"num_beams": 2, "do_sample": True, "top_k": 5}, ()),
    ("no_cache_greedy", "padded", {"use_cache": False}, ()),
    ("no_cache_sample", "one", {"use_cache": False, "do_sample": True, "top_k": 5}, ()),
    ("no_cache_beams_2", "one", {"use_cache": False, "num_beams": 2}, ()),
    ("static_greedy", "padded", {"cache_implementation": "static"}, ("cache_implementation",)),
    ("static_beams_2", "one", {"cache_implementation": "static", "num_beams": 2}, ("cache_implementation",)),
    ("static_beams_2_left_padded", "padded", {"cache_implementation": "static", "num_beams": 2},
     ("cache_implementation",)),
    ("static_sample_return_2", "one",
     {"cache_implementation": "static", "do_sample": True, "top_k": 5, "num_return_sequences": 2},
     ("cache_implementation",)),
    ("assisted", "one", {"assistant_model": _assistant}, ("assistant_model",)),
    ("prompt_lookup", "one", {"prompt_lookup_num_tokens": 3}, ("prompt_lookup_num_tokens",)),
    ("max_length", "padded", {"max_length": L + NEW, "max_new_tokens": None}, ()),
    ("min_length", "one", {"min_length": L + NEW, "eos_token_id": "likely"}, ()),
]


@pytest.fixture(params=["dense", "packed"])
def model(request):
    model = build_tiny_llama()
    if request.param == "packed":
        compress_(model, RTNConfig(bits=4, group_size=64), progress=False)
    return model


def _likely_token(model, prompt, ids):
    """The token greedy decoding picks first: as an eos id, min_length is what keeps it from ending the sequence."""
    return _greedy_loop(model, prompt, ids[:1], 1)[0, -1].item()


@pytest.mark.parametrize("inputs, options, oracle_drops", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_generate_equals_the_full_recompute_oracle(model, inputs, options, oracle_drops):
    prompt = _prompt()
    oracle = _oracle(model, prompt)
    attach_recovery_prompt(model, prompt)
    ids, mask = _inputs(inputs)
    options = {k: v() if callable(v) else v for k, v in options.items()}
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, **options}
    if kwargs.get("eos_token_id") == "likely":
        kwargs["eos_token_id"] = _likely_token(oracle, prompt, ids)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    torch.manual_seed(0)
    ours = model.generate(ids, attention_mask=mask, **kwargs)
    reference = {k: v for k, v in kwargs.items() if k not in oracle_drops}
    torch.manual_seed(0)
    theirs = oracle.generate(ids, attention_mask=mask, **{**reference, "use_cache": False})
    expand = kwargs.get("num_return_sequences", 1)
    assert ours.shape == (len(ids) * expand, L + NEW)
    assert torch.equal(ours[:, :L], ids.repeat_interleave(expand, dim=0))
    assert ours[:, L:].tolist() == theirs[:, L:].tolist()
    if inputs == "one" and not kwargs.get("do_sample") and kwargs.get("num_beams", 1) == 1 and "eos_token_id" not in kwargs:
        assert torch.equal(theirs, _greedy_loop(oracle, prompt, ids, NEW))  # the oracle itself is right


def test_pipeline_equals_the_oracle(model, byte_tokenizer):
    from transformers import pipeline

    prompt = _prompt(seed=5)
    oracle = _oracle(model, prompt)
    attach_recovery_prompt(model, prompt)
    pipe = pipeline("text-generation", model=model, tokenizer=byte_tokenizer, device="cpu")
    ids = byte_tokenizer("the cat sat", return_tensors="pt").input_ids
    for options in ({"do_sample": False}, {"num_beams": 2, "do_sample": False}):
        ours = pipe("the cat sat", max_new_tokens=NEW, return_tensors=True, **options)[0]["generated_token_ids"]
        theirs = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, use_cache=False,
                                 pad_token_id=byte_tokenizer.pad_token_id, **options)
        assert list(ours) == theirs[0].tolist()


def test_options_that_cannot_work_are_refused(tiny_llama):
    from transformers import DynamicCache

    attach_recovery_prompt(tiny_llama, _prompt())
    ids, mask = _inputs("one")
    with pytest.raises(UserInputError, match="use_cache=False"):
        tiny_llama.generate(ids, attention_mask=mask, use_cache=False, cache=DynamicCache(config=tiny_llama.config),
                            max_new_tokens=2)
    with pytest.raises(UserInputError, match="assistant_model"):  # the model as its own draft: prompts nest
        tiny_llama.generate(ids, attention_mask=mask, assistant_model=tiny_llama, max_new_tokens=2)
