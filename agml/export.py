"""Deploying a run: the adapter merged into its base and written as GGUF (`agml export`), and the probes re-run on
quantised copies (`agml eval RUN --quantize TYPE`).

GGUF files are written with the `gguf` package: f32, f16 and the block types it can quantise itself (q8_0, q4_0,
q4_1). The k-quants people download (q4_k_m, q5_k_m) come from llama.cpp's own quantiser, through the optional
`llama-cpp-python` package (`pip install agml[gguf]`), which also runs the quantised files. Without it, quantised
probes run through transformers' GGUF loader (which dequantises the blocks, so the weights are exactly the
quantised ones; only the runtime differs).

A quantiser rounds every weight to its block's grid, and a small, sparse unlearning update can round away with it.
`write_gguf_lora` writes the adapter alone as a llama.cpp LoRA GGUF: applied at run time on a quantised base, its
update stays in float32 instead of being rounded into the base's blocks.

Llama layout: llama.cpp applies rotary embeddings to interleaved pairs of each head's dimensions, transformers to
its two halves, so the Q and K rows of each head are reordered on the way out (transformers undoes it on load).
Qwen2 rotates halves in both, so its rows are written as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agml.errors import AgmlError, InputError
from agml.io import atomic_path

QUANT_BLOCK = 32  # weights per quantisation block (the sub-block of the k-quants)
# Types the gguf package writes itself (2-D weights; 1-D ones stay f32).
PACKAGE_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
# Types llama.cpp's quantiser writes from an f32 file: name -> llama_ftype.
LLAMA_CPP_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
EXPORT_TYPES = tuple(dict.fromkeys((*PACKAGE_TYPES, *LLAMA_CPP_TYPES)))
EVAL_TYPES = tuple(t for t in EXPORT_TYPES if t not in ("f32",))
BASE_ROW = "base "  # label prefix of the rows that quantise the base without the adapter
_GGUF_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_MODEL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>")


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _require_llama_cpp(what: str):
    try:
        import llama_cpp
    except ImportError as err:
        raise AgmlError(f"{what} needs llama.cpp: pip install 'agml[gguf]' (builds llama.cpp, takes minutes; "
                        "see `make gguf`)") from err
    return llama_cpp


# --- tensors ---------------------------------------------------------------------------------------------------


def gguf_architecture(model) -> str:
    """llama.cpp's architecture name for a transformers causal LM; AgmlError for those this writer cannot write."""
    name = type(model).__name__
    if name not in _GGUF_ARCH:
        raise AgmlError(f"GGUF export supports {', '.join(_GGUF_ARCH)}; this model is a {name}")
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise AgmlError(f"GGUF export supports plain rotary embeddings only; this model uses {rope['rope_type']!r}")
    return _GGUF_ARCH[name]


def rope_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' halves [x0..x(d/2-1), y0..] to llama.cpp's pairs [x0, y0, x1, ..]."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 CPU tensor) for every weight of a Llama/Qwen2 model, in llama.cpp's layout."""
    arch = gguf_architecture(model)
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        _, name = _gguf_name(model, key)
        value = value.detach().to("cpu", torch.float32)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            value = rope_interleave(value, heads)
        yield name, value


def _gguf_name(model, key: str) -> tuple[str, str]:
    """(transformers state-dict key, GGUF tensor name)."""
    if key in _MODEL_TENSORS:
        return key, _MODEL_TENSORS[key]
    prefix, _, rest = key.partition(".layers.")
    index, _, local = rest.partition(".")
    if prefix != "model" or not index.isdigit() or local not in _LAYER_TENSORS:
        raise AgmlError(f"GGUF export does not know where {key} goes in a {gguf_architecture(model)} GGUF file")
    return key, f"blk.{index}.{_LAYER_TENSORS[local]}"


def _encoded(values: torch.Tensor, qtype: str):
    """(array, raw type) as GGUFWriter.add_tensor takes them; 1-D tensors and odd widths stay float32."""
    import gguf

    array = values.numpy()
    if qtype == "f32" or array.ndim < 2:
        return array, None
    if qtype == "f16" or array.shape[-1] % QUANT_BLOCK:
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    return gguf.quants.quantize(array, kind), kind


# --- tokenizer -------------------------------------------------------------------------------------------------


def _token_types(tokenizer, size: int) -> list[int]:
    from gguf import TokenType

    types = [int(TokenType.NORMAL)] * size
    special = set(tokenizer.all_special_ids)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < size:
            special_token = added.special or token_id in special
            types[token_id] = int(TokenType.CONTROL if special_token else TokenType.USER_DEFINED)
    return types


def _bpe_merges(tokenizer) -> list[str]:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AgmlError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise AgmlError(f"GGUF export writes byte-level BPE tokenizers only; this one is {model.get('type')!r}")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def write_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    """Vocabulary, merges, token types, special ids and chat template, under llama.cpp's keys."""
    merges = _bpe_merges(tokenizer)
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise AgmlError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = _token_types(tokenizer, vocab_size)
    for i in range(vocab_size):
        if i not in by_id:
            types[i] = 5  # UNUSED: the model's embedding is larger than the vocabulary
    writer.add_tokenizer_model("gpt2")
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(_adds_bos(tokenizer))
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def source_tokenizer_pre(model_name: str) -> str | None:
    """llama.cpp's pre-tokenizer name recorded in the GGUF the model came from (the built-in model's is one)."""
    import gguf

    from agml.models import BUILTIN_MODEL, builtin_gguf_path

    path = builtin_gguf_path() if model_name == BUILTIN_MODEL else Path(model_name)
    if path.suffix != ".gguf" or not path.is_file():
        return None
    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


# --- writing ---------------------------------------------------------------------------------------------------


def _file_type(qtype: str) -> int:
    from gguf import LlamaFileType

    return int({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1}[qtype])


def _write_hparams(writer, model, qtype: str, name: str) -> None:
    import gguf

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(qtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@contextlib.contextmanager
def _atomic_file(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out` that replaces it once the block succeeds."""
    if out.is_dir():
        raise InputError(f"{out} is a folder; give a .gguf file name")
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise InputError(f"folder {out.parent} does not exist")
    with atomic_path(out) as staging:
        yield staging


def write_gguf(model, tokenizer, out: str | os.PathLike, qtype: str = "f16", force: bool = False,
               name: str = "agml", tokenizer_pre: str | None = None) -> Path:
    """Write a plain (merged) Llama/Qwen2 model and its tokenizer as one GGUF file, atomically.

    qtype: f32, f16, q8_0, q4_0 or q4_1 (the gguf package's own writers); see `export_gguf` for llama.cpp's types.
    """
    import gguf

    if qtype not in PACKAGE_TYPES:
        raise InputError(f"the gguf package writes {', '.join(PACKAGE_TYPES)}; got {qtype!r}")
    arch = gguf_architecture(model)
    out = Path(out)
    with _atomic_file(out, force) as staging:
        writer = gguf.GGUFWriter(str(staging), arch)
        _write_hparams(writer, model, qtype, name)
        write_tokenizer(writer, tokenizer, int(model.config.vocab_size), tokenizer_pre)
        for tensor_name, values in gguf_tensors(model):
            array, raw_type = _encoded(values, qtype)
            writer.add_tensor(tensor_name, array, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def llama_cpp_quantize(source: str | os.PathLike, out: str | os.PathLike, qtype: str, threads: int = 1) -> Path:
    """llama.cpp's quantiser (`llama_model_quantize`) from an f32/f16 GGUF to one of LLAMA_CPP_TYPES."""
    if qtype not in LLAMA_CPP_TYPES:
        raise InputError(f"llama.cpp quantisation types here: {', '.join(LLAMA_CPP_TYPES)}; got {qtype!r}")
    llama_cpp = _require_llama_cpp(f"quantising to {qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_TYPES[qtype]
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise AgmlError(f"llama.cpp could not quantise {source} to {qtype} (code {code})")
    return Path(out)


def export_gguf(model, tokenizer, out: str | os.PathLike, qtype: str = "f16", force: bool = False,
                name: str = "agml", tokenizer_pre: str | None = None) -> Path:
    """`write_gguf` for the gguf package's types; the k-quants through llama.cpp's quantiser from an f32 file."""
    if qtype in PACKAGE_TYPES:
        return write_gguf(model, tokenizer, out, qtype, force, name, tokenizer_pre)
    if qtype not in LLAMA_CPP_TYPES:
        raise InputError(f"--type must be one of {', '.join(EXPORT_TYPES)}; got {qtype!r}")
    _require_llama_cpp(f"--type {qtype}")
    out = Path(out)
    with _atomic_file(out, force) as staging, tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        full = write_gguf(model, tokenizer, Path(scratch) / "f32.gguf", "f32", name=name, tokenizer_pre=tokenizer_pre)
        llama_cpp_quantize(full, staging, qtype)
    return out


def _lora_factors(peft_model) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(HF weight name, lora_A (r, in), lora_B (out, r), alpha) per adapted Linear; zeros outside a mask."""
    from peft.tuners.lora.layer import LoraLayer

    from agml.layers import MaskedLoraLinear

    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    if getattr(config, "use_rslora", False) or getattr(config, "use_dora", False):
        raise AgmlError("llama.cpp LoRA adapters are plain LoRA (scale alpha/r): no rsLoRA or DoRA")
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if isinstance(module, MaskedLoraLinear):
            lora_a, lora_b = module.dense_factors(adapter)
        else:
            lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        yield f"{name}.weight", lora_a.detach().float().cpu(), lora_b.detach().float().cpu(), float(config.lora_alpha)


def write_gguf_lora(peft_model, out: str | os.PathLike, force: bool = False, name: str = "agml") -> Path:
    """The active adapter as a llama.cpp LoRA GGUF (`llama-cli --lora`, Ollama `ADAPTER`), applied at run time on
    any copy of the base, quantised or not: the update stays in float32 next to the quantised base weights."""
    import gguf

    base = peft_model.get_base_model()
    arch = gguf_architecture(base)
    factors = list(_lora_factors(peft_model))
    if not factors:
        raise AgmlError("the model has no LoRA layers to export")
    out = Path(out)
    with _atomic_file(out, force) as staging:
        writer = gguf.GGUFWriter(str(staging), arch)
        writer.add_type("adapter")
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, factors[0][3])
        for key, lora_a, lora_b, _ in factors:
            _, target = _gguf_name(base, key)
            if arch == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):
                heads = base.config.num_attention_heads if "attn_q" in target else base.config.num_key_value_heads
                lora_b = rope_interleave(lora_b, heads)
            writer.add_tensor(f"{target}.lora_a", lora_a.numpy())
            writer.add_tensor(f"{target}.lora_b", lora_b.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


# --- runs ------------------------------------------------------------------------------------------------------


def merged_run(run: str | os.PathLike):
    """(merged plain model on the CPU, tokenizer, LoadedRun): the run's adapter folded into its base weights."""
    from agml.runs import load_run

    loaded = load_run(run, device="cpu")
    merged = loaded.model.merge_and_unload()
    merged.eval()
    return merged, loaded.tokenizer, loaded


def export_run(run: str | os.PathLike, out: str | os.PathLike, qtype: str = "f16", force: bool = False,
               tokenizer_pre: str | None = None) -> Path:
    """`agml export RUN --gguf OUT`: checks first, then merge and write. tokenizer_pre: llama.cpp's pre-tokenizer
    name; by default the one recorded in the GGUF the base came from (none for other bases: llama.cpp then warns
    and uses its default GPT-2 split)."""
    if qtype not in EXPORT_TYPES:
        raise InputError(f"--type must be one of {', '.join(EXPORT_TYPES)}; got {qtype!r}")
    if qtype not in PACKAGE_TYPES:
        _require_llama_cpp(f"--type {qtype}")
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    merged, tokenizer, loaded = merged_run(run)
    options = loaded.config["options"]
    return export_gguf(merged, tokenizer, out, qtype, force, name=f"agml {Path(run).name}",
                       tokenizer_pre=tokenizer_pre or source_tokenizer_pre(options["model"]))


# --- changed blocks --------------------------------------------------------------------------------------------


def _dequantized(reader) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: gguf.dequantize(t.data, t.tensor_type) for t in reader.tensors}


def changed_blocks(base_file: str | os.PathLike, merged_file: str | os.PathLike) -> dict:
    """How many 32-weight blocks (along each row) differ between two GGUF files of the same model and type."""
    import gguf

    base = _dequantized(gguf.GGUFReader(base_file))
    merged = _dequantized(gguf.GGUFReader(merged_file))
    changed = total = 0
    tensors = {}
    for name, values in merged.items():
        if values.ndim < 2 or values.shape[-1] % QUANT_BLOCK:
            continue
        blocks = values.reshape(-1, QUANT_BLOCK) != base[name].reshape(-1, QUANT_BLOCK)
        count = int(blocks.any(axis=1).sum())
        total += blocks.shape[0]
        changed += count
        if count:
            tensors[name] = count
    return {"changed": changed, "total": total, "tensors": tensors}


# --- probes on quantised copies --------------------------------------------------------------------------------


@dataclass
class GgufRuntime:
    """Greedy answers from a GGUF file, optionally with the run's adapter applied at run time (unmerged): llama.cpp
    (adapter: a LoRA GGUF from `write_gguf_lora`) or transformers' GGUF loader (adapter: the run folder)."""

    path: Path
    tokenizer: object
    backend: str
    adapter: Path | None = None

    def answers(self, conversations: Sequence, max_new_tokens: int, batch_size: int) -> list[str]:
        if self.backend == "llama.cpp":
            return llama_cpp_answers(self.path, self.tokenizer, conversations, max_new_tokens, lora=self.adapter)
        from transformers import AutoModelForCausalLM

        from agml.generation import greedy_answers

        model = AutoModelForCausalLM.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                     dtype=torch.float32)
        if self.adapter is not None:
            model = _with_run_adapter(model, self.adapter)
        model.eval()
        return greedy_answers(model, self.tokenizer, conversations, max_new_tokens, batch_size)


def _with_run_adapter(model, run: Path):
    from agml import runs
    from agml.adapters import load_adapter

    if runs.read_config(run)["options"].get("method") == "lora":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(run / runs.ADAPTER_DIR))
    return load_adapter(model, run / runs.ADAPTER_DIR)


def _stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    return ids | {vocab[token] for token in _END_OF_TURN if token in vocab}


def llama_cpp_answers(path: str | os.PathLike, tokenizer, conversations: Sequence, max_new_tokens: int = 64,
                      threads: int = 1, lora: str | os.PathLike | None = None) -> list[str]:
    """Greedy answers from llama.cpp on the same prompt token ids as agml's evaluation (chat template applied by
    the run's tokenizer), so only the weights and the runtime differ. lora: a LoRA GGUF applied at run time."""
    from agml.data import prompt_ids

    llama_cpp = _require_llama_cpp("running a GGUF file in llama.cpp")
    encoded = [prompt_ids(tokenizer, conversation) for conversation in conversations]
    context = max(len(ids) for ids in encoded) + max_new_tokens + 8
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_batch=min(context, 512),
                          seed=0, verbose=False, lora_path=None if lora is None else str(lora))
    stop = _stop_ids(tokenizer)
    answers = []
    try:
        for ids in encoded:
            llm.reset()  # no reuse of the previous prompt's cache: each answer computed alone, like the reference
            produced: list[int] = []
            for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if token in stop or len(produced) >= max_new_tokens:
                    break
                produced.append(token)
            answers.append(tokenizer.decode(produced, skip_special_tokens=True).strip())
    finally:
        llm.close()
    return answers


def _rates(probes, answers: Sequence[str], facts: dict | None) -> dict:
    from agml.evaluation import pass_rates, probe_passes

    passed = [probe_passes(p, a, facts) for p, a in zip(probes, answers, strict=True)]
    return {kind: pass_rates(probes, passed, kind)["pass_rate"] for kind in ("forget", "retain")}


def _quantized_copies(model, tokenizer, folder: Path, label: str, qtypes: Sequence[str], backend: str,
                      pre: str | None) -> dict[str, Path]:
    """`model` as an f32 GGUF and in each of `qtypes`: llama.cpp's quantiser when it is the backend (or for the
    k-quants), else the gguf package's writer."""
    full = write_gguf(model, tokenizer, folder / f"{label}-f32.gguf", "f32", tokenizer_pre=pre)
    files = {"f32": full}
    for qtype in qtypes:
        out = folder / f"{label}-{qtype}.gguf"
        if backend == "llama.cpp" or qtype not in PACKAGE_TYPES:
            files[qtype] = llama_cpp_quantize(full, out, qtype)
        else:
            files[qtype] = write_gguf(model, tokenizer, out, qtype, tokenizer_pre=pre)
    return files


def quantized_eval(run: str | os.PathLike, qtypes: str | Sequence[str], probes=None, max_new_tokens: int = 64,
                   batch_size: int = 16, backend: str | None = None, unmerged: bool = True,
                   workdir: str | os.PathLike | None = None) -> dict:
    """Forget/retain pass rates of the merged model unquantised (transformers, float32) and quantised to each of
    `qtypes`; with `unmerged`, also of the quantised base with the adapter applied at run time (float32 factors,
    not rounded into the quantised weights). Also how many 32-weight blocks the merge still changes after
    quantisation (quantised base vs quantised merged; "f32" counts them before quantisation).

    backend: "llama.cpp" or "transformers"; None picks llama.cpp where installed. The k-quants need llama.cpp.
    """
    from agml.generation import greedy_answers
    from agml.models import load_model
    from agml.runs import load_run, run_facts

    qtypes = [qtypes] if isinstance(qtypes, str) else list(qtypes)
    unknown = [t for t in qtypes if t not in EVAL_TYPES]
    if not qtypes or unknown:
        raise InputError(f"--quantize takes types among {', '.join(EVAL_TYPES)}; got {', '.join(qtypes) or 'none'}")
    backend = backend or ("llama.cpp" if llama_cpp_available() else "transformers")
    if backend not in ("llama.cpp", "transformers"):
        raise InputError(f"backend must be llama.cpp or transformers, got {backend!r}")
    if backend == "llama.cpp" or any(t not in PACKAGE_TYPES for t in qtypes):
        _require_llama_cpp(f"--quantize {','.join(qtypes)}")
    run = Path(run)
    loaded = load_run(run, device="cpu")
    probes = probes or loaded.probes
    if not probes:
        raise InputError(f"{run} holds no probes; pass --probes")
    tokenizer, options = loaded.tokenizer, loaded.config["options"]
    facts = run_facts(run, loaded.config)
    pre = source_tokenizer_pre(options["model"])
    conversations = [p.messages for p in probes]
    answers: dict[str, list[str]] = {}
    blocks = {}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="agml-quantize-") as scratch:
        folder = Path(scratch)
        adapter = run
        if unmerged and backend == "llama.cpp":
            adapter = write_gguf_lora(loaded.model, folder / "adapter.gguf")
        merged = loaded.model.merge_and_unload().eval()
        reference = greedy_answers(merged, tokenizer, conversations, max_new_tokens, batch_size)
        merged_files = _quantized_copies(merged, tokenizer, folder, "merged", qtypes, backend, pre)
        del merged, loaded
        base, _ = load_model(options["model"], dtype="float32", device="cpu")
        base_reference = greedy_answers(base, tokenizer, conversations, max_new_tokens, batch_size)
        base_files = _quantized_copies(base, tokenizer, folder, "base", qtypes, backend, pre)
        del base
        for qtype, merged_file in merged_files.items():
            blocks[qtype] = changed_blocks(base_files[qtype], merged_file)
        for qtype in qtypes:
            runtime = GgufRuntime(merged_files[qtype], tokenizer, backend)
            answers[qtype] = runtime.answers(conversations, max_new_tokens, batch_size)
            if unmerged and qtype != "f16":  # f16 has no blocks to round an update away; the row would only cost time
                runtime = GgufRuntime(base_files[qtype], tokenizer, backend, adapter)
                answers[f"{qtype}+adapter"] = runtime.answers(conversations, max_new_tokens, batch_size)
            # The base quantised the same way: how much the type alone moves the rates (quantisation's noise floor).
            answers[f"{BASE_ROW}{qtype}"] = GgufRuntime(base_files[qtype], tokenizer, backend).answers(
                conversations, max_new_tokens, batch_size)
    unquantized = _rates(probes, reference, facts)
    base_unquantized = _rates(probes, base_reference, facts)
    rows = {}
    for label, texts in answers.items():
        rates = _rates(probes, texts, facts)
        base_row = label.startswith(BASE_ROW)
        against, against_answers = (base_unquantized, base_reference) if base_row else (unquantized, reference)
        rows[label] = {
            "pass_rate": rates,
            "change": {k: _difference(rates[k], against[k]) for k in rates},
            "blocks": None if base_row else blocks.get(label),
            "answers_differ": sum(a != b for a, b in zip(texts, against_answers, strict=True)),
        }
    return {
        "backend": backend,
        "n": {kind: sum(p.type == kind for p in probes) for kind in ("forget", "retain")},
        "unquantized": unquantized,
        "base_unquantized": base_unquantized,
        "blocks_f32": blocks["f32"],
        "types": rows,
        "probes": [{"prompt": p.prompt, "type": p.type, "unquantized": reference[i],
                    **{label: texts[i] for label, texts in answers.items()}} for i, p in enumerate(probes)],
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def format_quantized(result: dict) -> str:
    """A table: pass rates unquantised and per type, changed blocks, answers that differ."""
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    def points(value):
        return "" if value is None else f" ({100 * value:+.1f})"

    n = result["n"]
    lines = [f"probes in {result['backend']} ({n['forget']} forget, {n['retain']} retain); TYPE = merged then "
             "quantised, TYPE+adapter = quantised base with the adapter applied unmerged; blocks = 32-weight blocks "
             "where quantised merged != quantised base",
             f"{'weights':<16} {'forget pass':<18} {'retain pass':<18} {'blocks changed':<22} answers differ",
             f"{'f32 (merged)':<16} {pct(result['unquantized']['forget']):<18} "
             f"{pct(result['unquantized']['retain']):<18} "
             f"{str(result['blocks_f32']['changed']) + ' of ' + str(result['blocks_f32']['total']):<22} reference",
             f"{'f32 base':<16} {pct(result['base_unquantized']['forget']):<18} "
             f"{pct(result['base_unquantized']['retain']):<18} {'no adapter':<22} base reference"]
    for label, row in result["types"].items():
        rates, change, blocks = row["pass_rate"], row["change"], row["blocks"]
        forget = pct(rates["forget"]) + points(change["forget"])
        retain = pct(rates["retain"]) + points(change["retain"])
        if label.startswith(BASE_ROW):
            changed = "base, vs f32 base"
        else:
            changed = "adapter unmerged" if blocks is None else f"{blocks['changed']} of {blocks['total']}"
        lines.append(f"{label:<16} {forget:<18} {retain:<18} {changed:<22} "
                     f"{row['answers_differ']} of {len(result['probes'])}")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------------------


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run as GGUF for llama.cpp/Ollama: merged model and/or LoRA adapter",
                       description="--gguf: the adapter merged into the base; f32/f16/q8_0/q4_0/q4_1 are written by "
                                   "the gguf package, q4_k_m/q5_k_m/q6_k need llama.cpp (pip install 'agml[gguf]'). "
                                   "--lora-gguf: the adapter alone, applied at run time on any copy of the base "
                                   "(llama.cpp --lora, Ollama ADAPTER); it keeps the update out of the quantised "
                                   "weights.")
    p.add_argument("run", metavar="RUN", help="run folder written by agml unlearn")
    p.add_argument("--gguf", metavar="OUT", help="merged model GGUF file to write")
    p.add_argument("--type", default="f16", choices=EXPORT_TYPES, help="weight type of --gguf (default f16)")
    p.add_argument("--tokenizer-pre", metavar="NAME",
                   help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre, e.g. llama-bpe, qwen2, smollm); default: "
                        "the one in the base's own GGUF, if it came from one")
    p.add_argument("--lora-gguf", metavar="OUT", help="LoRA adapter GGUF file to write")
    p.add_argument("--force", action="store_true", help="replace output files that exist")
    p.set_defaults(handler=export_handler)


def export_handler(args: argparse.Namespace) -> int:
    if not args.gguf and not args.lora_gguf:
        raise InputError("give --gguf OUT (merged model) and/or --lora-gguf OUT (adapter)")
    if args.lora_gguf:
        from agml.runs import load_run

        target = Path(args.lora_gguf)
        if target.exists() and not args.force:
            raise InputError(f"{target} exists; pass --force to replace it")
        out = write_gguf_lora(load_run(args.run, device="cpu").model, target, args.force,
                              name=f"agml {Path(args.run).name}")
        print(f"written {out} (LoRA adapter, {out.stat().st_size / 2**20:.1f} MiB)")
    if args.gguf:
        out = export_run(args.run, args.gguf, args.type, args.force, args.tokenizer_pre)
        print(f"written {out} ({args.type}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _type_list(text: str) -> list[str]:
    types = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in EVAL_TYPES]
    if not types or unknown:
        raise argparse.ArgumentTypeError(f"types must be among {', '.join(EVAL_TYPES)}; got {text!r}")
    return types


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """`agml eval RUN --quantize TYPE[,TYPE..]` (the eval command calls `quantized_eval_handler` when it is set)."""
    parser.add_argument("--quantize", type=_type_list, metavar="TYPE[,TYPE..]",
                        help="re-run the probes on the merged model quantised to each TYPE "
                             f"({', '.join(EVAL_TYPES)}); in llama.cpp where installed, else through transformers' "
                             "GGUF loader (the k-quants need llama.cpp)")


def quantized_eval_handler(args: argparse.Namespace, probes=None) -> int:
    from agml import runs

    result = quantized_eval(args.run, args.quantize, probes=probes, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size)
    print(format_quantized(result))
    if getattr(args, "json", None):
        runs.write_json(args.json, result)
        print(f"written to {args.json}")
    return 0
