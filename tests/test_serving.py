"""vLLM's ``prompt_embeds`` for a model with a recovery prompt: fed to the bare model they give the logits and greedy
tokens of our runtime with the prompt (dense and packed), the prompt goes before the BOS and the chat template, a saved
prompt with the embeddings gives the same tensors as the model, the server's encoding round-trips, bad input is
refused.

The tokenizer is built in memory (bytes, a BOS that ``tokenizer(text)`` adds, a ChatML-like template that writes the
BOS itself): the embedded SmolLM2 tokenizer needs its GGUF converted first (about 20 s), and a tokenizer that adds a
BOS is what lets a test see where the prompt goes relative to it.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from builders import build_tiny_llama

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.nn import PackedLinear
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt, save_recovery_prompt
from hf_compress_prompt.serving import completion_request, encode_for_server, prompt_embeds

N = 5
BOS = 256
TEXTS = ["The capital of France is", "a b c"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def chat_tokenizer():
    """Byte tokens 0-255; ``<s>`` (256, the model's BOS, added by ``tokenizer(text)``), ``<|im_start|>`` 257,
    ``<|im_end|>`` 258; a chat template that starts with the BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>")
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert tokenizer("x")["input_ids"][0] == BOS and tokenizer.bos_token_id == BOS
    return tokenizer


def _prompt(hidden=128, n=N):
    g = torch.Generator().manual_seed(0)
    return RecoveryPrompt(torch.randn(n, hidden, generator=g) * 0.5, {"base_model": "tiny"})


@pytest.fixture(params=["dense", "packed"])
def model(request):
    model = build_tiny_llama()
    if request.param == "packed":
        compress_(model, RTNConfig(bits=4, group_size=64), progress=False)
    return attach_recovery_prompt(model, _prompt())


def _bare_last_logits(model, embeds):
    """Last-position logits of ``model`` without its prompt, from ``embeds`` ``(seq, hidden)``."""
    model.disable_recovery_prompt()
    try:
        return model(inputs_embeds=embeds.unsqueeze(0), use_cache=False).logits[0, -1]
    finally:
        model.enable_recovery_prompt()


def _bare_greedy(model, embeds, steps):
    """Greedy decoding as vLLM runs it from ``prompt_embeds``: the bare model, the embeddings of each new token
    appended, everything recomputed (no cache)."""
    embedding, tokens = model.get_input_embeddings(), []
    model.disable_recovery_prompt()
    try:
        seq = embeds.unsqueeze(0)  # (1, seq, hidden)
        for _ in range(steps):
            token = model(inputs_embeds=seq, use_cache=False).logits[0, -1].argmax()
            tokens.append(int(token))
            seq = torch.cat([seq, embedding(token.view(1, 1))], dim=1)  # (1, seq + 1, hidden)
    finally:
        model.enable_recovery_prompt()
    return tokens


def test_the_prompt_goes_first_then_the_bos_and_the_text(model, chat_tokenizer):
    (embeds,) = prompt_embeds(model, chat_tokenizer, TEXTS[0])
    ids = chat_tokenizer(TEXTS[0])["input_ids"]
    weight = model.get_input_embeddings().weight
    assert ids[0] == BOS and embeds.shape == (N + len(ids), 128) and embeds.dtype == weight.dtype
    torch.testing.assert_close(embeds[:N], hcp.recovery.recovery_prompt_of(model).embedding, rtol=0, atol=0)
    torch.testing.assert_close(embeds[N], weight[BOS], rtol=0, atol=0)
    torch.testing.assert_close(embeds[N:], weight[ids], rtol=0, atol=0)
    (plain,) = prompt_embeds(model, chat_tokenizer, TEXTS[0], add_special_tokens=False)
    torch.testing.assert_close(plain[N:], weight[ids[1:]], rtol=0, atol=0)


def test_the_bare_model_on_them_gives_our_runtimes_logits_and_tokens(model, chat_tokenizer):
    with torch.no_grad(), hcp.kernels.reference_only():
        for text, embeds in zip(TEXTS, prompt_embeds(model, chat_tokenizer, TEXTS)):
            enc = chat_tokenizer(text, return_tensors="pt")
            ours = model(**enc).logits[0, -1]  # the runtime, prompt attached
            torch.testing.assert_close(_bare_last_logits(model, embeds), ours, rtol=1e-4, atol=1e-4)
            without = _bare_last_logits(model, embeds[N:])  # the check can tell: the prompt moves the logits
            assert (without - ours).abs().max() > 1e-2
            theirs = model.generate(**enc, do_sample=False, max_new_tokens=8)[0, enc["input_ids"].shape[1]:].tolist()
            assert len(theirs) >= 4
            assert _bare_greedy(model, embeds, 8)[:len(theirs)] == theirs, text


def test_chat_is_the_template_then_the_text(model, chat_tokenizer):
    rendered = chat_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    (chat,) = prompt_embeds(model, chat_tokenizer, CHAT, chat=True)
    (text,) = prompt_embeds(model, chat_tokenizer, [rendered], add_special_tokens=False)
    torch.testing.assert_close(chat, text, rtol=0, atol=0)  # the template's BOS, once
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(chat[N], weight[BOS], rtol=0, atol=0)
    one_turn = prompt_embeds(model, chat_tokenizer, ["Hi", [{"role": "user", "content": "Hi"}]], chat=True)
    torch.testing.assert_close(one_turn[0], one_turn[1], rtol=0, atol=0)
    ids = chat_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")["input_ids"]
    with torch.no_grad(), hcp.kernels.reference_only():
        torch.testing.assert_close(_bare_last_logits(model, chat), model(ids).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_a_saved_prompt_with_the_embeddings_equals_the_model(model, chat_tokenizer, tmp_path):
    expected = prompt_embeds(model, chat_tokenizer, TEXTS)
    if any(isinstance(m, PackedLinear) for m in model.modules()):  # packed: the compressed-tensors export vLLM serves
        folder = hcp.export(model, tmp_path / "ct", tokenizer=chat_tokenizer)
    else:  # dense: only the prompt folder
        folder = tmp_path / "dense"
        save_recovery_prompt(hcp.recovery.recovery_prompt_of(model), folder / "recovery_prompt", model)
    module, weight = model.get_input_embeddings(), model.get_input_embeddings().weight.detach().clone()
    prompt = hcp.recovery.recovery_prompt_of(model)
    for source, embeddings in [(folder / "recovery_prompt", module), (folder / "recovery_prompt", weight),
                               (folder, weight), (str(folder), module), (prompt, weight)]:
        got = prompt_embeds(source, chat_tokenizer, TEXTS, embeddings=embeddings)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if (folder / "model.safetensors").is_file():  # an export: the embedding weight read from its safetensors
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            stored = f.get_tensor("model.embed_tokens.weight")
        torch.testing.assert_close(prompt_embeds(folder, chat_tokenizer, TEXTS[0], embeddings=stored)[0], expected[0],
                                   rtol=0, atol=0)
    half = prompt_embeds(prompt, chat_tokenizer, TEXTS[0], embeddings=weight, dtype=torch.bfloat16)[0]
    assert half.dtype == torch.bfloat16 and torch.equal(half, expected[0].to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_servers_encoding_round_trips(dtype):
    tensor = torch.randn(7, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    encoded = encode_for_server(tensor)
    back = torch.load(io.BytesIO(base64.b64decode(encoded, validate=True)), weights_only=True,
                      map_location="cpu")  # as vLLM's server reads it
    assert back.dtype == dtype and torch.equal(back, tensor)
    big = torch.randn(1000, 128)
    assert len(encode_for_server(big[:7])) < len(encode_for_server(big)) / 20  # a view sends its rows, not its storage


def test_a_completion_request_is_json_with_the_encoded_embeds():
    a, b = torch.randn(3, 128), torch.randn(4, 128)
    body = json.loads(json.dumps(completion_request("served", a, max_tokens=5, temperature=0.0)))
    assert body == {"model": "served", "prompt_embeds": encode_for_server(a), "max_tokens": 5, "temperature": 0.0}
    several = completion_request("served", [a, encode_for_server(b)])["prompt_embeds"]
    assert [torch.load(io.BytesIO(base64.b64decode(s)), weights_only=True).shape for s in several] == [(3, 128),
                                                                                                        (4, 128)]


# name -> (call(parts, tokenizer), what the one-line message says); ``parts`` is the fixture below
REFUSALS = {
    "model without a prompt": (lambda p, tok: prompt_embeds(p["bare"], tok, "x"), "has no recovery prompt attached"),
    "hidden size": (lambda p, tok: prompt_embeds(_prompt(hidden=64), tok, "x", embeddings=p["emb"]),
                    "hidden size 128: it was trained for another model"),
    "vocabulary": (lambda p, tok: prompt_embeds(RecoveryPrompt(p["prompt"].embedding, {"vocab_size": 300}), tok, "x",
                                                embeddings=p["emb"]), "vocabulary of 300 tokens"),
    "no embeddings": (lambda p, tok: prompt_embeds(p["prompt"], tok, "x"), "without a model, pass embeddings"),
    "embeddings with a model": (lambda p, tok: prompt_embeds(p["prompted"], tok, "x", embeddings=p["emb"]),
                                "pass embeddings only with"),
    "no texts": (lambda p, tok: prompt_embeds(p["prompted"], tok, []), "texts is empty"),
    "empty text": (lambda p, tok: prompt_embeds(p["prompted"], tok, ["a", ""]), r"texts\[1\] is empty"),
    "empty chat": (lambda p, tok: prompt_embeds(p["prompted"], tok, [[]], chat=True), r"texts\[0\] is empty"),
    "no tokens": (lambda p, tok: prompt_embeds(p["prompted"], _NoTokens(), "x"), "gives no tokens"),
    "chat without chat=True": (lambda p, tok: prompt_embeds(p["prompted"], tok, [CHAT]), "is a list .* pass chat=True"),
    "a message without chat=True": (lambda p, tok: prompt_embeds(p["prompted"], tok, CHAT), "is a dict .* chat=True"),
    "add_special_tokens on a chat": (lambda p, tok: prompt_embeds(p["prompted"], tok, CHAT, chat=True,
                                                                  add_special_tokens=True), "chat template writes"),
    "no chat template": (lambda p, tok: prompt_embeds(p["prompted"], _NoTokens(), "x", chat=True), "no chat template"),
    "another tokenizer": (lambda p, tok: prompt_embeds(p["prompt"], tok, "x", embeddings=p["emb"].weight[:200]),
                          "beyond the 200 rows"),
    "not a prompt": (lambda p, tok: prompt_embeds(p["emb"].weight, tok, "x"), "model_or_prompt is a Parameter"),
    "encode a 3D tensor": (lambda p, tok: encode_for_server(torch.zeros(1, 3, 128)), "got a torch.float32 tensor"),
    "encode ids": (lambda p, tok: encode_for_server(torch.zeros(3, 128, dtype=torch.long)), "floating-point"),
    "a second prompt": (lambda p, tok: completion_request("m", torch.zeros(3, 128), prompt="hi"),
                        "does not take prompt"),
    "no embeds": (lambda p, tok: completion_request("m", []), "embeds is empty"),
}


@pytest.fixture(scope="module")
def parts():
    bare, prompt = build_tiny_llama(), _prompt()
    return {"bare": bare, "prompt": prompt, "emb": bare.get_input_embeddings(),
            "prompted": attach_recovery_prompt(build_tiny_llama(), prompt)}


class _NoTokens:
    """A tokenizer that gives no ids and has no chat template."""

    chat_template = None

    def __call__(self, text, **kwargs):
        return {"input_ids": []}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_input_is_refused_in_one_line(case, parts, chat_tokenizer):
    call, match = REFUSALS[case]
    with pytest.raises(UserInputError, match=match) as info:
        call(parts, chat_tokenizer)
    assert "\n" not in str(info.value)
