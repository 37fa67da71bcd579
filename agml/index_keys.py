"""Where a masked adapter's neuron ids sit in a state dict (see docs/architecture.md, "Adapters").

In memory each `MaskedLoraLinear` holds one small module per adapter in the `nn.ModuleDict`s `lora_out_index` /
`lora_in_index`, with the ids in its persistent buffer `ids`: key `<layer>.lora_out_index.<adapter>.ids`. PEFT's
`save_pretrained` drops the adapter name, so a saved file has `<layer>.lora_out_index.ids`. This is PEFT's own
`<layer>.lora_A.<adapter>.weight` pattern (prefix, adapter, tensor), which PEFT's loading and hotswapping rely on.

Files written before this layout have `<layer>.lora_out_index` (no `.ids`); they still load.
"""

from __future__ import annotations

OUT_INDEX = "lora_out_index"
IN_INDEX = "lora_in_index"
INDEX_BUFFER = "ids"
# PEFT `key_mapping` entry (regex on keys without the "base_model.model." prefix) that renames a previous-layout
# index key to the current one.
PREVIOUS_LAYOUT_KEY_MAPPING = {rf"\.({OUT_INDEX}|{IN_INDEX})$": rf".\1.{INDEX_BUFFER}"}


def parse_index_key(key: str) -> tuple[str, str] | None:
    """(module key, OUT_INDEX or IN_INDEX) for a saved neuron-index key in either layout; None for other keys."""
    parts = key.split(".")
    if parts[-1] == INDEX_BUFFER and len(parts) > 2 and parts[-2] in (OUT_INDEX, IN_INDEX):
        return ".".join(parts[:-2]), parts[-2]
    if len(parts) > 1 and parts[-1] in (OUT_INDEX, IN_INDEX):
        return ".".join(parts[:-1]), parts[-1]
    return None


def is_previous_layout(keys) -> bool:
    """True when a saved adapter stores its neuron ids under the previous keys (`<layer>.lora_out_index`)."""
    return any(key.rpartition(".")[2] in (OUT_INDEX, IN_INDEX) for key in keys)
