"""Forget probes without a `forbidden` list would pass whatever the model says: they get the concept's names."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from agml.data import PromptRecord
from agml.errors import InputError


def with_default_forbidden(probes: Sequence[PromptRecord], terms: Sequence[str],
                           log: Callable[[str], None] | None = None) -> list[PromptRecord]:
    """Give every forget probe that has no `forbidden` list the concept's names (and say so through `log`)."""
    missing = [p for p in probes if p.type == "forget" and not p.forbidden]
    if not missing:
        return list(probes)
    names = tuple(t for t in terms if t.strip())
    if not names:
        raise InputError(f"{missing[0].source}: forget probe without 'forbidden', and no concept name to use instead")
    if log is not None:
        log(f"{len(missing)} forget probe(s) have no 'forbidden' list; they fail when the answer names "
            f"{', '.join(repr(n) for n in names)}")
    return [dataclasses.replace(p, forbidden=names) if p.type == "forget" and not p.forbidden else p for p in probes]
