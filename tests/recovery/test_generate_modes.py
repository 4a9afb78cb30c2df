"""``generate`` with an attached recovery prompt gives the tokens of prompt tuning by its definition in every decoding
mode: the oracle is transformers' own decoding (the same mode, the same seed) on a copy of the model that sees
``[prompt embeddings; token embeddings]`` at every step with no cache, recomputing everything. Each mode either
equals the oracle or is refused with one clear error; none may return other tokens silently.

A recovery prefix (keys and values in every layer) goes through the same table: its oracle is PEFT's prefix-tuning
forward recomputed at every step (a fresh cache holding the prefix, the mask extended, positions after it)."""

import copy

import pytest
import torch
from builders import build_tiny_llama, greedy_with_prompt_recomputed

from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.recovery import RecoveryPrefix, RecoveryPrompt, attach_recovery_prompt

N, L, NEW = 6, 10, 6


def _prompt(hidden=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RecoveryPrompt(torch.randn(N, hidden, generator=g) * 0.5, {"base_model": "tiny"})


def _prefix(seed=0):
    """A random prefix for the tiny Llama: 2 layers of 2 key/value heads of 32 (PEFT's initial scale)."""
    g = torch.Generator().manual_seed(seed)
    return RecoveryPrefix(torch.randn(2, 2, 2, N, 32, generator=g), {"base_model": "tiny"})


def _prefix_oracle(model, prefix):
    """A copy of ``model`` (no runtime attached) whose every forward is PEFT's prefix-tuning forward: a fresh cache
    holding the prefix (any cache transformers passes back is dropped), the mask extended with ones, the tokens'
    positions shifted by ``n``. Used with ``use_cache=False``, the whole sequence is recomputed at every step."""
    from transformers import DynamicCache

    oracle = copy.deepcopy(model)

    def prefixed(module, args, kwargs):
        assert not args
        ids = kwargs["input_ids"]
        batch = len(ids)
        cache = DynamicCache(config=module.config)
        for i, layer in enumerate(prefix.key_values):  # (2, h, n, d)
            cache.update(layer[0].expand(batch, -1, -1, -1).clone(), layer[1].expand(batch, -1, -1, -1).clone(), i)
        kwargs.pop("past_key_values", None)
        kwargs["cache"] = cache
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"].new_ones(batch, N), kwargs["attention_mask"]], 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + N
        return args, kwargs

    oracle.register_forward_pre_hook(prefixed, with_kwargs=True)
    return oracle


def _peft_prefix_twin(model, prefix):
    """PEFT's own prefix-tuning model of a copy of ``model`` (no runtime attached), holding ``prefix``."""
    from peft import PrefixTuningConfig, get_peft_model

    twin = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)).eval()
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(prefix.to_peft())
    return twin


def _greedy_recomputed(twin, ids, steps):
    """Greedy decoding with ``twin``'s forward, everything recomputed every step (no generate, no cache)."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, twin(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq


def _oracle(model, prompt):
    """A copy of ``model`` (no runtime attached) whose every forward gets the prompt's embeddings before the tokens'
    and no cache: positions ``0..n-1`` for the prompt, the tokens' own positions shifted by ``n``, the mask extended
    with ones. Used with ``use_cache=False``, transformers recomputes the whole sequence at every step."""
    oracle = copy.deepcopy(model)

    def prepend(module, args, kwargs):
        if kwargs.get("input_ids") is None:
            return None  # greedy_with_prompt_recomputed's forward: the prompt is in inputs_embeds already
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


class _RepeatFirstToken:
    """A caller's logits processor: always the first token of the sequence the caller passed."""

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, input_ids[:, :1], 0.0)


class _StopAtLength:
    """A caller's stopping criterion: stop once the sequence the caller passed has grown by 3 tokens."""

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((len(input_ids),), input_ids.shape[1] >= L + 3, dtype=torch.bool)


def _allowed_after(batch_id, sequence):  # prefix_allowed_tokens_fn: depends on the caller's first two tokens
    return [int(sequence[0]), int(sequence[1]), 7]


def _logits_processors():
    from transformers import LogitsProcessorList

    return LogitsProcessorList([_RepeatFirstToken()])


def _stopping_criteria():
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([_StopAtLength()])


ZERO_LIKED = {(0,): 10.0}  # token 0 (the placeholders' id) made the likeliest: options that read the ids tell


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
    ("prefill_chunks", "padded", {"prefill_chunk_size": N + 2}, ("prefill_chunk_size",)),
    ("max_length", "padded", {"max_length": L + NEW, "max_new_tokens": None}, ()),
    ("min_length", "one", {"min_length": L + NEW, "eos_token_id": "likely"}, ()),
    ("repetition_penalty_left_padded", "padded", {"repetition_penalty": 100.0, "sequence_bias": ZERO_LIKED}, ()),
    ("no_repeat_ngram_size", "one", {"no_repeat_ngram_size": 1, "sequence_bias": ZERO_LIKED}, ()),
    ("encoder_repetition_penalty", "one", {"encoder_repetition_penalty": 100.0, "sequence_bias": ZERO_LIKED}, ()),
    ("prefix_allowed_tokens_fn", "one", {"prefix_allowed_tokens_fn": lambda: _allowed_after}, ()),
    ("logits_processor", "one", {"logits_processor": _logits_processors}, ()),
    ("stopping_criteria", "one", {"stopping_criteria": _stopping_criteria}, ()),
]


@pytest.fixture(params=["dense", "packed"])
def model(request):
    model = build_tiny_llama()
    if request.param == "packed":
        compress_(model, RTNConfig(bits=4, group_size=64), progress=False)
    return model


def _likely_token(oracle, ids):
    """The token greedy decoding picks first: as an eos id, min_length is what keeps it from ending the sequence."""
    return oracle.generate(ids[:1], max_new_tokens=1, do_sample=False, use_cache=False, pad_token_id=0)[0, -1].item()


@pytest.mark.parametrize("inputs, options, oracle_drops", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_generate_equals_the_full_recompute_oracle(model, inputs, options, oracle_drops):
    prompt = _prompt()
    _check_case(model, _oracle(model, prompt), prompt, inputs, options, oracle_drops,
                lambda oracle, ids: greedy_with_prompt_recomputed(oracle, prompt, ids, NEW))


@pytest.mark.parametrize("inputs, options, oracle_drops", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_generate_with_a_prefix_equals_peft_prefix_recomputed(tiny_llama, inputs, options, oracle_drops):
    # the same table with a prefix (dense only: a packed model runs the same runtime path)
    prefix = _prefix()
    twin = _peft_prefix_twin(tiny_llama, prefix)  # copies made before the prefix is attached
    _check_case(tiny_llama, _prefix_oracle(tiny_llama, prefix), prefix, inputs, options, oracle_drops,
                lambda oracle, ids: _greedy_recomputed(twin, ids, NEW))


def _check_case(model, oracle, prompt, inputs, options, oracle_drops, recomputed):
    """``model`` with ``prompt`` attached generates the oracle's tokens for one row of the table; for plain greedy
    decoding the oracle also equals ``recomputed(oracle, ids)`` (decoding by the definition, no generate)."""
    attach_recovery_prompt(model, prompt)
    ids, mask = _inputs(inputs)
    options = {k: v() if callable(v) else v for k, v in options.items()}
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, **options}
    if kwargs.get("eos_token_id") == "likely":
        kwargs["eos_token_id"] = _likely_token(oracle, ids)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    torch.manual_seed(0)
    ours = model.generate(ids, attention_mask=mask, **kwargs)
    reference = {k: v for k, v in kwargs.items() if k not in oracle_drops}
    torch.manual_seed(0)
    theirs = oracle.generate(ids, attention_mask=mask, **{**reference, "use_cache": False})
    expand = kwargs.get("num_return_sequences", 1)
    assert ours.shape == (len(ids) * expand, L + (3 if "stopping_criteria" in kwargs else NEW))
    assert torch.equal(ours[:, :L], ids.repeat_interleave(expand, dim=0))
    assert ours[:, L:].tolist() == theirs[:, L:].tolist()
    if inputs == "one" and set(options) <= {"use_cache", "cache_implementation", "assistant_model",
                                            "prompt_lookup_num_tokens"}:  # plain greedy decoding
        assert torch.equal(theirs, recomputed(oracle, ids))  # the oracle is right


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_pipeline_equals_the_oracle(model, byte_tokenizer, kind):
    from transformers import pipeline

    prompt = _prompt(seed=5) if kind == "prompt" else _prefix(seed=5)
    oracle = (_oracle if kind == "prompt" else _prefix_oracle)(model, prompt)
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
    with pytest.raises(UserInputError, match="prefill_chunk_size"):  # a first chunk of placeholders only
        tiny_llama.generate(ids, attention_mask=mask, prefill_chunk_size=N, max_new_tokens=2)
    with pytest.raises(UserInputError, match="guidance_scale"):  # would run the model without the prompt inside
        tiny_llama.generate(ids, attention_mask=mask, guidance_scale=1.5, max_new_tokens=2)


def test_a_streamer_gets_the_callers_tokens(model):
    # The placeholders standing for the prompt are not streamed: the first put is the caller's input ids.
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(1, -1))

        def end(self):
            self.ended = True

    attach_recovery_prompt(model, _prompt())
    ids, mask = _inputs("one")
    recorder = Recorder()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         streamer=recorder)
    assert torch.equal(recorder.puts[0], ids) and recorder.ended
    assert torch.equal(torch.cat(recorder.puts, dim=1), out)
