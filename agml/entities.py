"""Where a concept's name sits in tokenised text: every tokenisation of its variants, and their positions.

A BPE tokenizer spells "Inception" differently at the start of a text, after a space, capitalised or not, so a
search for the concept's tokens needs every variant (see `term_variants`). Used by the mask scoring option that
scores at the entity's positions and by the representation term that acts there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from agml.errors import InputError


def term_variants(term: str) -> list[str]:
    """The spellings of `term` a tokenizer sees: as given, lower-case, capitalised, title-case, each with and
    without a leading space (deduplicated, order kept)."""
    term = term.strip()
    if not term:
        raise InputError("a concept term must be a non-empty string")
    cases = dict.fromkeys([term, term.lower(), term[:1].upper() + term[1:], term.title(), term.upper()])
    return list(dict.fromkeys(prefix + case for case in cases for prefix in ("", " ")))


def entity_token_ids(tokenizer, terms: Sequence[str]) -> list[list[int]]:
    """Token id sequences of every variant of every term (JSON-friendly lists, longest first)."""
    if not terms:
        raise InputError("give at least one concept term")
    sequences: dict[tuple[int, ...], None] = {}
    for term in terms:
        for variant in term_variants(term):
            ids = tuple(tokenizer(variant, add_special_tokens=False)["input_ids"])
            if ids:
                sequences[ids] = None
    return [list(ids) for ids in sorted(sequences, key=lambda ids: (-len(ids), ids))]


def entity_positions(input_ids: torch.Tensor, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Bool mask like `input_ids` (batch, seq): True on every token of every occurrence of any sequence."""
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    found = torch.zeros_like(input_ids, dtype=torch.bool)
    length = input_ids.shape[1]
    for sequence in sequences:
        n = len(sequence)
        if n == 0 or n > length:
            continue
        pattern = torch.as_tensor(list(sequence), dtype=input_ids.dtype, device=input_ids.device)
        windows = input_ids.unfold(1, n, 1)  # (batch, length - n + 1, n)
        starts = (windows == pattern).all(-1)
        for offset in range(n):
            found[:, offset:offset + starts.shape[1]] |= starts
    return found
