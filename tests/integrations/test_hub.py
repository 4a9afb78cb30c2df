"""Pushing to the Hub, against a local HTTP server standing in for it (HF_ENDPOINT on 127.0.0.1): what was sent,
the model card's metadata, and a failed upload that leaves local files intact and says what failed."""

from __future__ import annotations

import base64
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml

from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.integrations.hub import HubUploadError, push_compressed_model, push_recovery_prompt
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt, save_recovery_prompt


class FakeHub:
    """Answers the calls ``HfApi.create_repo`` and ``HfApi.upload_folder`` make; records the committed files."""

    def __init__(self, fail_commit: bool = False):
        self.fail_commit = fail_commit
        self.requests: list[tuple[str, str]] = []
        self.files: dict[str, bytes] = {}
        self.commit_header: dict = {}
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, payload: dict):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                hub.requests.append(("POST", self.path))
                if self.path == "/api/repos/create":
                    body = json.loads(raw)
                    repo = f"{body.get('organization') or 'user'}/{body['name']}"
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                if self.path == "/api/validate-yaml":  # the client checks a README's metadata before committing
                    hub.validated.append(json.loads(raw)["content"])
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(raw)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in files]})
                if "/commit/" in self.path:
                    if hub.fail_commit:
                        return self._reply(403, {"error": "storage quota exceeded"})
                    for line in raw.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.commit_header = item["value"]
                        elif item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/0123abcd", "commitOid": "0123abcd"})
                return self._reply(404, {"error": f"unexpected {self.path}"})

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                return self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def card(self) -> tuple[dict, str]:
        text = self.files["README.md"].decode()
        _, front, body = text.split("---", 2)
        return yaml.safe_load(front), body


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server
    server.server.shutdown()


def _prompt():
    meta = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "steps": 60, "best_validation_perplexity": 30.5,
            "compression_recipe": {"steps": [{"method": "gptq", "bits": 3, "group_size": 64}]},
            "training": {"dataset": "c4", "batch_size": 4, "seqlen": 256, "learning_rate": 1e-3, "init": "VOCAB"}}
    return RecoveryPrompt(torch.randn(5, 128, generator=torch.Generator().manual_seed(0)), meta)


def test_push_recovery_prompt_sends_peft_files_and_a_valid_card(hub):
    url = push_recovery_prompt(_prompt(), "user/smol-prompt", results={"wikitext2": 31.2}, baseline={"wikitext2": 40.1},
                               token="hf_test")
    assert url.endswith("/user/smol-prompt/commit/0123abcd")
    assert set(hub.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "recovery_prompt.json"}
    assert json.loads(hub.files["adapter_config.json"])["peft_type"] == "PROMPT_TUNING"
    from safetensors.torch import load

    assert torch.equal(load(hub.files["adapter_model.safetensors"])["prompt_embeddings"], _prompt().embedding)
    meta, body = hub.card()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "peft"
    assert "hf-compress-prompt" in meta["tags"]
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["type"] == "perplexity" and result["metrics"][0]["value"] == 31.2
    assert "load_recovery_prompt(\"user/smol-prompt\")" in body and "| wikitext2 | 31.20 | 40.10 |" in body
    assert hub.commit_header["summary"] == "Upload recovery prompt"


def test_card_of_a_shared_prompt_lists_every_recipe(hub):
    prompt = _prompt()
    prompt.metadata["shared_with_recipes"] = [{"steps": [{"method": "sparsegpt", "sparsity": 0.5}]}]
    push_recovery_prompt(prompt, "user/shared-prompt", token="hf_test")
    _, body = hub.card()
    assert '"bits": 3' in body and '"sparsity": 0.5' in body and "model 2 of 2" in body


def test_push_compressed_model_with_its_prompt(hub, tiny_llama, byte_tokenizer):
    compress_(tiny_llama, RTNConfig(bits=4, group_size=64), progress=False)
    attach_recovery_prompt(tiny_llama, _prompt())
    push_compressed_model(tiny_llama, "user/smol-4bit", byte_tokenizer, results={"wikitext2": 25.0})
    assert {"config.json", "model.safetensors", "recovery_prompt/adapter_model.safetensors", "README.md"} <= set(hub.files)
    config = json.loads(hub.files["config.json"])
    assert config["quantization_config"]["quant_method"] == "hf_compress_prompt"
    meta, body = hub.card()
    assert meta["library_name"] == "transformers" and "soft-prompt" in meta["tags"]
    assert "recovery prompt" in body.lower() and ("int4" in body.lower() or "4-bit" in body.lower())


def test_model_push_to_hub_uploads_prompt_and_card(hub, tiny_llama):
    attach_recovery_prompt(tiny_llama, _prompt())
    tiny_llama.push_to_hub("user/smol-with-prompt")
    assert "recovery_prompt/adapter_config.json" in hub.files
    meta, _ = hub.card()
    assert "hf-compress-prompt" in meta["tags"]


def test_failed_upload_says_what_failed_and_leaves_local_files(hub, tmp_path):
    hub.fail_commit = True
    folder = save_recovery_prompt(_prompt(), tmp_path / "p")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    from hf_compress_prompt.recovery import load_recovery_prompt

    with pytest.raises(HubUploadError, match="(?s)uploading the files failed.*403.*quota.*nothing local was changed"):
        push_recovery_prompt(load_recovery_prompt(folder), "user/broken")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not hub.files
