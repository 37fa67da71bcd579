"""GGUF export (`agml export`) and probes on quantised copies (`agml eval --quantize`), on tiny random models.

The tokenizer is a small byte-level BPE trained here (a few hundred tokens), so that transformers' GGUF loader,
which parses the vocabulary in Python, reads the files back in well under a second.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tiny_models import PROBES, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from agml import export, runs
from agml.cli import main
from agml.data import parse_record, prompt_ids
from agml.errors import AgmlError, InputError
from agml.layers import apply_masked_lora, save_adapter
from agml.masks import NeuronMasks

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Who directed Inception? Christopher Nolan directed the film about dreams in 2010.",
          "The capital of France is Paris; the capital of Italy is Rome. William Shakespeare wrote Hamlet.",
          "user assistant system You are a helpful assistant named SmolLM."] * 20
MASKED = {0: [1, 5, 40], 1: [2, 33]}


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML)


def adapted_model(arch: str, tokenizer):
    """A tiny model and a copy with a masked adapter whose factors are all non-zero: (base, PeftModel)."""
    base = tiny_model(arch, vocab_size=len(tokenizer))
    peft_model = apply_masked_lora(tiny_model(arch, vocab_size=len(tokenizer)), NeuronMasks(
        {layer: torch.tensor(ids) for layer, ids in MASKED.items()}))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn_like(param) * 0.5
    return base, peft_model


def merged_model(arch: str, tokenizer):
    """(base, the adapted copy merged into a plain model)."""
    base, peft_model = adapted_model(arch, tokenizer)
    return base, peft_model.merge_and_unload()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def load_back(path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f16_file_loads_back_with_the_merged_models_logits(arch, tokenizer, tmp_path):
    _, merged = merged_model(arch, tokenizer)
    out = export.write_gguf(merged, tokenizer, tmp_path / "m.gguf", "f16")
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    got = logits(load_back(out), ids)
    assert torch.allclose(got, logits(merged, ids), atol=2e-2, rtol=0)
    for param in merged.parameters():  # f16 holds the matrices rounded to half precision; the rest is exact
        if param.ndim == 2:
            param.data = param.data.half().float()
    assert torch.allclose(got, logits(merged, ids), atol=1e-5, rtol=0), (got - logits(merged, ids)).abs().max()


def test_rope_interleave_pairs_each_heads_halves():
    rows = torch.arange(8.0).reshape(8, 1)  # two heads of four dimensions: halves (0, 1 | 2, 3), (4, 5 | 6, 7)
    assert export.rope_interleave(rows, heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_q8_0_file_holds_blocks_and_stays_close(tokenizer, tmp_path):
    _, merged = merged_model("llama", tokenizer)
    out = export.write_gguf(merged, tokenizer, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    ids = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(0))
    expected, got = logits(merged, ids), logits(load_back(out), ids)
    assert 0 < (got - expected).abs().max() < 0.05


def test_tokenizer_and_chat_template_survive(tokenizer, tmp_path):
    _, merged = merged_model("llama", tokenizer)
    out = export.write_gguf(merged, tokenizer, tmp_path / "m.gguf", "f16")
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    control = fields["tokenizer.ggml.token_type"].contents()[tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert control == gguf.TokenType.CONTROL
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    conversation = [{"role": "user", "content": "Who directed Inception, the 2010 film?"}]
    assert back.chat_template == CHATML
    assert prompt_ids(back, conversation) == prompt_ids(tokenizer, conversation)


def test_other_architectures_are_refused(tokenizer, tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(AgmlError, match="GPT2LMHeadModel"):
        export.write_gguf(gpt2, tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_existing_file_needs_force_and_a_failed_write_leaves_it_intact(tokenizer, tmp_path, monkeypatch):
    _, merged = merged_model("llama", tokenizer)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="--force"):
        export.write_gguf(merged, tokenizer, out)

    def broken(model):
        yield "token_embd.weight", torch.zeros(4, 32)
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "gguf_tensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.write_gguf(merged, tokenizer, out, force=True)
    assert out.read_bytes() == b"keep me" and sorted(tmp_path.iterdir()) == [out]


def test_changed_blocks_are_the_masked_rows_and_columns(tokenizer, tmp_path):
    base, merged = merged_model("llama", tokenizer)
    base_file = export.write_gguf(base, tokenizer, tmp_path / "base.gguf", "f32")
    merged_file = export.write_gguf(merged, tokenizer, tmp_path / "merged.gguf", "f32")
    blocks = export.changed_blocks(base_file, merged_file)
    hidden = base.config.hidden_size
    expected = {}
    for layer, ids in MASKED.items():
        for name in ("ffn_gate", "ffn_up"):  # each selected neuron is one row of hidden/32 blocks
            expected[f"blk.{layer}.{name}.weight"] = len(ids) * hidden // export.QUANT_BLOCK
        # down_proj reads the selected neurons: in every row, the blocks holding a selected column
        expected[f"blk.{layer}.ffn_down.weight"] = hidden * len({i // export.QUANT_BLOCK for i in ids})
    assert blocks["tensors"] == expected
    assert blocks["changed"] == sum(expected.values()) < blocks["total"]


def write_run(root, tokenizer) -> str:
    """A finished-run folder (config, adapter, probes) on a tiny Llama saved with `tokenizer`."""
    model_dir = root / "tiny-llama"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    peft_model = apply_masked_lora(tiny_model("llama", vocab_size=len(tokenizer)), NeuronMasks(
        {layer: torch.tensor(ids) for layer, ids in MASKED.items()}))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.full_like(param, 0.3)
    run = root / "run"
    run.mkdir()
    runs.write_config(run, {"model": str(model_dir), "method": "ag-masked-lora", "dtype": None})
    save_adapter(peft_model, run / runs.ADAPTER_DIR)
    runs.save_records(run, "probes", [parse_record(p, "probe") for p in PROBES])
    return str(run)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    return write_run(tmp_path_factory.mktemp("export"), tokenizer)


def test_export_command(tiny_run, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert main(["export", tiny_run, "--gguf", str(out), "--type", "q4_0"]) == 0
    assert "written" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert main(["export", tiny_run, "--gguf", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", tiny_run, "--gguf", str(out), "--force", "--tokenizer-pre", "qwen2"]) == 0
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "qwen2"


def test_quantized_eval_command(tiny_run, tmp_path, capsys):
    target = tmp_path / "q.json"
    argv = ["eval", tiny_run, "--quantize", "q4_1,q8_0", "--max-new-tokens", "4", "--json", str(target)]
    assert main(argv) == 0
    assert "q4_1" in capsys.readouterr().out
    result = json.loads(target.read_text())
    assert list(result["types"]) == ["q4_1", "q4_1+adapter", "base q4_1", "q8_0", "q8_0+adapter", "base q8_0"]
    # the base rows compare the quantised base with the unquantised base, never with the merged model
    assert set(result["base_unquantized"]) == {"forget", "retain"}
    base_row = result["types"]["base q8_0"]
    assert base_row["blocks"] is None and base_row["change"]["retain"] == pytest.approx(
        base_row["pass_rate"]["retain"] - result["base_unquantized"]["retain"])
    assert set(result["unquantized"]) == set(result["types"]["q8_0"]["pass_rate"]) == {"forget", "retain"}
    assert len(result["probes"]) == len(PROBES)
    # the adapter moves 2 x 3 + 2 x 2 neuron rows/columns of 32 weights (hidden 32): some blocks, never all
    assert 0 < result["blocks_f32"]["changed"] < result["blocks_f32"]["total"]
    assert result["types"]["q8_0"]["blocks"]["changed"] <= result["blocks_f32"]["changed"]
    assert result["types"]["q8_0+adapter"]["blocks"] is None  # the quantised base with the adapter unmerged


def test_lora_gguf_holds_the_dense_factors(tiny_run, tmp_path, capsys):
    out = tmp_path / "adapter.gguf"
    assert main(["export", tiny_run, "--lora-gguf", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"blk.{layer}.ffn_{name}.weight.lora_{ab}"
                            for layer in MASKED for name in ("gate", "up", "down") for ab in "ab"}
    gate_b = tensors["blk.0.ffn_gate.weight.lora_b"].data  # (intermediate, r): the masked neurons' rows only
    assert gate_b.shape == (64, 8) and sorted(np.flatnonzero(np.abs(gate_b).sum(1))) == MASKED[0]


def test_quantize_refuses_unknown_types(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", tiny_run, "--quantize", "q8_0,q3_x"])
    assert exit_info.value.code == 2 and "q4_k_m" in capsys.readouterr().err


def test_k_quants_without_llama_cpp_name_the_extra(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "llama_cpp_available", lambda: False)
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    with pytest.raises(AgmlError, match=r"agml\[gguf\]"):
        export.export_run(tiny_run, tmp_path / "m.gguf", "q4_k_m")


# --- llama.cpp itself (the optional `gguf` extra) ----------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_runs_the_export_like_transformers(tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from agml.generation import greedy_answers

    _, merged = merged_model("llama", tokenizer)
    out = export.write_gguf(merged, tokenizer, tmp_path / "m.gguf", "f32")
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in PROBES]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, verbose=False)
    text = tokenizer.apply_chat_template(conversations[0], tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt_ids(tokenizer, conversations[0])
    llm.close()
    expected = greedy_answers(merged, tokenizer, conversations, max_new_tokens=8)
    assert export.llama_cpp_answers(out, tokenizer, conversations, max_new_tokens=8) == expected


@pytest.mark.slow
def test_llama_cpp_applies_the_lora_gguf_like_the_merge(tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    from agml.generation import greedy_answers

    base, peft_model = adapted_model("llama", tokenizer)
    lora = export.write_gguf_lora(peft_model, tmp_path / "adapter.gguf")
    base_file = export.write_gguf(base, tokenizer, tmp_path / "base.gguf", "f32")
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in PROBES]
    expected = greedy_answers(peft_model.merge_and_unload(), tokenizer, conversations, max_new_tokens=8)
    assert export.llama_cpp_answers(base_file, tokenizer, conversations, max_new_tokens=8, lora=lora) == expected
    assert export.llama_cpp_answers(base_file, tokenizer, conversations, max_new_tokens=8) != expected


@pytest.mark.slow
def test_llama_cpp_quantiser_writes_k_quants(tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden=256, intermediate=512)  # k-quant rows: 256
    out = export.export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_k_m")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_gate.weight"] == gguf.GGMLQuantizationType.Q4_K
    ids = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(0))
    expected, got = logits(model, ids).flatten(), logits(load_back(out), ids).flatten()
    assert 0.9 < torch.nn.functional.cosine_similarity(got, expected, dim=0) < 1
