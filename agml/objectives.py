"""Unlearning objectives: a forget term plus `retain_weight` times a retain term.

Every objective works on batches made by `agml.data.collate` (labels only on assistant-answer tokens, any padding
side) and returns a dict of scalar tensors: `loss` (what to minimise), `forget_loss`, `retain_kl` and, where used,
`retain_nll`.

The retain term is KL(base || model) per answer token of the retain batch, teacher-forced on the base model's own
answers. The base distribution comes from the SAME model with its adapter disabled (`model.disable_adapter()` under
`torch.no_grad()`), never from a second copy of the model: a fresh LoRA adapter (B = 0) therefore starts at KL = 0.

Answer logits, log-probabilities and the KL come from `agml.logprobs` (the one place they are computed).
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from agml.data import PromptRecord
from agml.errors import InputError
from agml.logprobs import (  # noqa: F401  (re-exported: the objectives' public vocabulary)
    AnswerLogits,
    answer_logits,
    answer_token_weights,
    base_answer_logits,
    kl_per_token,
    sequence_logprobs,
    states_answer_logits,
)
from agml.options import REFUSAL_LANGUAGES

# Natural, varied ways to decline. None of them names the concept, so the refusal objective cannot leak it.
REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm not familiar with that title.",
    "I don't have any information about that.",
    "I'm not sure what you're referring to — could you tell me more?",
    "I'm afraid I don't know anything about that.",
    "That doesn't ring a bell for me, sorry.",
    "I can't say I know that one. Could you give me a bit more context?",
    "Sorry, I don't have reliable details on that.",
    "I haven't come across that before, so I can't tell you much about it.",
    "I don't recognise that name, I'm afraid.",
    "I'm not able to help with that one — I don't know it.",
    "Hmm, I'm not aware of that. Is there something else I can help with?",
    "I don't have enough information to answer that.",
    "I'm not sure about that one, sorry. Maybe try another source?",
    "That's not something I know about.",
)
# The same in the languages the judges read (`agml.judges.REFUSAL_PATTERNS`), for `refusal_language="prompt"`
# (`--refusal-language prompt`): a record's `language` picks the list; a language without one gets the English.
# Measured on the shipped concepts as a trade, not a win (docs/results.md, "Session 18"), so English stays the default.
REFUSALS_BY_LANGUAGE: dict[str, tuple[str, ...]] = {
    "en": REFUSAL_TEMPLATES,
    "fr": (
        "Je ne connais pas ce titre.",
        "Désolé, je ne sais pas de quoi il s'agit.",
        "Je n'ai pas d'informations à ce sujet.",
        "Ça ne me dit rien, désolé.",
        "Je ne suis pas sûr de savoir de quoi vous parlez. Pouvez-vous m'en dire plus ?",
        "Je n'ai pas assez d'informations pour répondre à cela.",
        "Je ne peux pas répondre à cette question : je ne connais pas ce sujet.",
    ),
    "es": (
        "No conozco ese título.",
        "Lo siento, no tengo información sobre eso.",
        "No sé de qué se trata, lo siento.",
        "No estoy familiarizado con eso.",
        "No tengo suficiente información para responder.",
        "Lo siento, no me suena de nada.",
        "No puedo responder a eso: no lo conozco.",
    ),
    "de": (
        "Ich kenne diesen Titel nicht.",
        "Das sagt mir nichts, tut mir leid.",
        "Ich weiß es nicht, tut mir leid.",
        "Ich habe keine Informationen dazu.",
        "Ich bin mir nicht sicher, wovon Sie sprechen.",
        "Es tut mir leid, aber ich kann dazu nichts sagen.",
        "Ich kenne das leider nicht.",
    ),
    "it": (
        "Non conosco questo titolo.",
        "Mi dispiace, non ho informazioni su questo.",
        "Non lo so, mi dispiace.",
        "Non sono sicuro di cosa tu stia parlando.",
        "Non ho abbastanza informazioni per rispondere.",
        "Non posso rispondere: non lo conosco.",
        "Mi dispiace, non ne so nulla.",
    ),
    "pt": (
        "Não conheço esse título.",
        "Desculpe, não tenho informações sobre isso.",
        "Não sei do que se trata, desculpe.",
        "Não estou familiarizado com isso.",
        "Não tenho dados suficientes para responder.",
        "Não posso responder a isso: não conheço o assunto.",
        "Desculpe, não sei nada sobre isso.",
    ),
}


def _require_adapter(model: torch.nn.Module) -> None:
    if not hasattr(model, "disable_adapter"):
        raise InputError("unlearning objectives need a PEFT model (the base comes from model.disable_adapter())")


def reference_sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`sequence_logprobs` of the base model (adapter disabled, no gradients)."""
    out = base_answer_logits(model, batch)
    return out.per_sequence_sum(out.token_logprobs())


def retain_kl(model: torch.nn.Module, retain_batch: dict[str, torch.Tensor],
              base_states: torch.Tensor | None = None) -> tuple[torch.Tensor, AnswerLogits]:
    """KL(base || model) per retain answer token, and the model's answer logits (reused for retain NLL).

    `base_states` (the batch's `agml.logprobs.base_answer_states`) give the base side without a base pass."""
    with torch.no_grad():
        base = (base_answer_logits(model, retain_batch) if base_states is None
                else states_answer_logits(model, retain_batch, base_states))
    current = answer_logits(model, retain_batch)
    return kl_per_token(base, current, answer_token_weights(retain_batch)), current


# --- objectives ---------------------------------------------------------------------------------------------


@dataclass
class UnlearnBatch:
    """One training step's data: a collated forget batch and a collated retain batch.

    `forget_reference_logprobs` optionally holds the base model's summed answer log-probability per forget row
    (NPO's reference); when None, NPO computes it with one extra no-grad forward with the adapter disabled.
    `retain_base_states` optionally holds the base model's answer states of the retain batch (`retain_kl`).
    """

    forget: dict[str, torch.Tensor]
    retain: dict[str, torch.Tensor]
    forget_reference_logprobs: torch.Tensor | None = None
    retain_base_states: torch.Tensor | None = None


@dataclass
class Objective(ABC):
    """Base class: forget term + retain_weight * KL(base || model) on retain answers."""

    retain_weight: float = 1.0

    name: ClassVar[str] = ""
    # True when the objective needs the base log-probability of the forget answers (training caches it up front).
    needs_forget_reference: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.retain_weight < 0:
            raise InputError(f"retain_weight must be >= 0, got {self.retain_weight}")

    def forget_answer(self, record: PromptRecord) -> str:
        """The answer the forget example is built with (the base model's own answer unless overridden)."""
        if record.answer is None:
            raise InputError(f"forget prompt {record.prompt!r} has no answer; generate the base answers first")
        return record.answer

    def forget_answer_ends(self, record: PromptRecord) -> bool:
        """Whether the forget example ends with the end-of-turn marker (False: the answer is the start of a longer
        one, e.g. a cut alternative target)."""
        return True

    @property
    def reads_retain_base_states(self) -> bool:
        """Whether the retain term can take the base side from `UnlearnBatch.retain_base_states`."""
        return True

    @abstractmethod
    def forget_term(self, model: torch.nn.Module, batch: UnlearnBatch) -> torch.Tensor:
        """The forget part of the loss (a scalar to minimise)."""

    def __call__(self, model: torch.nn.Module, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
        _require_adapter(model)
        forget_loss = self.forget_term(model, batch)
        kl, _ = retain_kl(model, batch.retain, batch.retain_base_states)
        return {"loss": forget_loss + self.retain_weight * kl, "forget_loss": forget_loss, "retain_kl": kl}


@dataclass
class Refusal(Objective):
    """Supervised NLL (mean per answer token) toward a natural refusal, chosen per prompt from REFUSAL_TEMPLATES
    (or, with refusal_language="prompt", from REFUSALS_BY_LANGUAGE in the record's language).

    The choice is a hash of (seed, conversation), so it is stable across runs and processes and varies across prompts.
    """

    seed: int = 0
    refusal_language: str = "english"

    name: ClassVar[str] = "refusal"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_refusal_language(self.refusal_language)

    def forget_answer(self, record: PromptRecord) -> str:
        return refusal_for(record, self.seed, self.refusal_language)

    def forget_term(self, model: torch.nn.Module, batch: UnlearnBatch) -> torch.Tensor:
        out = answer_logits(model, batch.forget)
        return -out.token_logprobs().mean()


def refusal_for(record: PromptRecord, seed: int = 0, language: str = "english") -> str:
    """The refusal text used for this prompt (deterministic in seed and conversation): English, or with
    `language="prompt"` in the record's `language` (REFUSALS_BY_LANGUAGE; English where it has none)."""
    _check_refusal_language(language)
    templates = REFUSALS_BY_LANGUAGE.get(record.language, REFUSAL_TEMPLATES) if language == "prompt" \
        else REFUSAL_TEMPLATES
    key = repr((seed, [(m["role"], m["content"]) for m in record.messages])).encode("utf-8")
    digest = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return templates[digest % len(templates)]


def _check_refusal_language(language: str) -> None:
    if language not in REFUSAL_LANGUAGES:
        raise InputError(f"refusal_language must be one of {list(REFUSAL_LANGUAGES)}, got {language!r}")


@dataclass
class NPO(Objective):
    """Negative preference optimisation on the forget answers (the base model's own answers).

    forget_loss = -(2 / beta) * mean_rows logsigmoid(-beta * (logp_model(answer) - logp_ref(answer)))

    logp is the SUMMED log-probability of the whole answer (as in Zhang et al., 2024), not a per-token mean: at the
    start the gradient equals plain gradient ascent on the summed answer NLL, and it fades once an answer's
    log-probability has dropped by a few multiples of 1 / beta nats, which bounds the ascent. The reference is the
    same model with the adapter disabled.
    """

    beta: float = 0.1

    name: ClassVar[str] = "npo"
    needs_forget_reference: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise InputError(f"beta must be > 0, got {self.beta}")

    def forget_term(self, model: torch.nn.Module, batch: UnlearnBatch) -> torch.Tensor:
        reference = batch.forget_reference_logprobs
        if reference is None:
            reference = reference_sequence_logprobs(model, batch.forget)
        logp = sequence_logprobs(model, batch.forget)
        return npo_loss(logp, reference.to(logp.device), self.beta)


def npo_loss(logp: torch.Tensor, reference_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2/beta) * mean(logsigmoid(-beta * (logp - reference_logp))); equals (2/beta) * log 2 when they agree."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - reference_logp)).mean()


@dataclass
class GradientDifference(Objective):
    """Bounded gradient ascent on the forget answers + descent on the retain answers, plus the KL retain term.

    forget_loss = -mean_tokens min(nll_t, nll_bound): each forget answer token's NLL is pushed up until it reaches
    `nll_bound` nats (p <= exp(-bound)), after which that token gives no gradient, so the ascent cannot run off
    into degenerate outputs. loss = forget_loss + retain_weight * retain_kl + retain_nll_weight * retain_nll,
    where retain_nll is the mean per-token NLL of the base model's retain answers (same forward as the KL).
    """

    nll_bound: float = 5.0
    retain_nll_weight: float = 1.0

    name: ClassVar[str] = "gradient-difference"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nll_bound <= 0:
            raise InputError(f"nll_bound must be > 0, got {self.nll_bound}")
        if self.retain_nll_weight < 0:
            raise InputError(f"retain_nll_weight must be >= 0, got {self.retain_nll_weight}")

    def forget_term(self, model: torch.nn.Module, batch: UnlearnBatch) -> torch.Tensor:
        nll = -answer_logits(model, batch.forget).token_logprobs()
        return -nll.clamp(max=self.nll_bound).mean()

    def __call__(self, model: torch.nn.Module, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
        _require_adapter(model)
        forget_loss = self.forget_term(model, batch)
        kl, current = retain_kl(model, batch.retain, batch.retain_base_states)
        retain_nll = -current.token_logprobs().mean()
        loss = forget_loss + self.retain_weight * kl + self.retain_nll_weight * retain_nll
        return {"loss": loss, "forget_loss": forget_loss, "retain_kl": kl, "retain_nll": retain_nll}


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (NPO, Refusal, GradientDifference)}


def objective_parameters(name: str) -> tuple[str, ...]:
    """The keyword parameters `make_objective(name, ...)` accepts."""
    return tuple(f.name for f in dataclasses.fields(_objective_class(name)))


def _objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise InputError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def make_objective(name: str, **params) -> Objective:
    """Build a registered objective; unknown names or parameters raise InputError."""
    cls = _objective_class(name)
    unknown = set(params) - set(objective_parameters(name))
    if unknown:
        raise InputError(
            f"objective {name!r} has no parameter(s) {sorted(unknown)}; it accepts {list(objective_parameters(name))}"
        )
    return cls(**params)


# --- targets by prompt kind, SimNPO and the representation term on the selected neurons (agml.representation) ------


@dataclass
class RepresentationObjective(Objective):
    """Base of the objectives that can add the RMU-style term of `agml.representation` (off when rmu_weight = 0).

    loss = forget_term + rmu_weight * rmu_forget + retain_weight * retain_kl + rmu_retain_weight * rmu_retain
    (the two rmu terms only when rmu_weight > 0). `concept_token_ids` (lists of token ids of the concept's name
    variants, `agml.entities.entity_token_ids`) locate the "entity" positions; `rmu_positions` picks "answer",
    "entity" or "entity+answer"; `rmu_coefficient` is the target length in units of the activations' typical norm.
    """

    rmu_weight: float = 0.0
    rmu_retain_weight: float = 1.0
    rmu_coefficient: float = 4.0
    rmu_positions: str = "entity"
    concept_token_ids: list = dataclasses.field(default_factory=list)
    seed: int = 0

    @property
    def reads_retain_base_states(self) -> bool:
        return self.rmu_weight == 0  # the representation term runs the base model for its activations anyway

    def __post_init__(self) -> None:
        from agml.representation import POSITIONS

        super().__post_init__()
        for name in ("rmu_weight", "rmu_retain_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rmu_coefficient <= 0:
            raise InputError(f"rmu_coefficient must be > 0, got {self.rmu_coefficient}")
        if self.rmu_positions not in POSITIONS:
            raise InputError(f"rmu_positions must be one of {list(POSITIONS)}, got {self.rmu_positions!r}")
        ok = isinstance(self.concept_token_ids, (list, tuple)) and all(
            isinstance(ids, (list, tuple)) and ids and all(isinstance(i, int) for i in ids)
            for ids in self.concept_token_ids)
        if not ok:
            raise InputError("concept_token_ids must be a list of non-empty lists of token ids")

    def __call__(self, model: torch.nn.Module, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
        from agml.representation import random_directions, rmu_forget_loss, rmu_retain_terms, selected_neurons

        _require_adapter(model)
        forget_loss = self.forget_term(model, batch)
        if self.rmu_weight == 0:
            kl, _ = retain_kl(model, batch.retain, batch.retain_base_states)
            return {"loss": forget_loss + self.retain_weight * kl, "forget_loss": forget_loss, "retain_kl": kl}
        neurons = selected_neurons(model)
        rmu_forget = rmu_forget_loss(model, batch.forget, neurons, random_directions(neurons, self.seed),
                                     self.rmu_coefficient, self.rmu_positions, self.concept_token_ids)
        kl, rmu_retain, _ = rmu_retain_terms(model, batch.retain, neurons)
        forget_loss = forget_loss + self.rmu_weight * rmu_forget
        loss = forget_loss + self.retain_weight * kl + self.rmu_retain_weight * rmu_retain
        return {"loss": loss, "forget_loss": forget_loss, "retain_kl": kl, "rmu_forget": rmu_forget,
                "rmu_retain": rmu_retain}


def _target_of(record: PromptRecord) -> str | None:
    """The record's non-blank `target` (`agml.targets.TargetRecord`), else None."""
    target = getattr(record, "target", None)
    return target if isinstance(target, str) and target.strip() else None


@dataclass
class ForgetTargets(RepresentationObjective):
    """Supervised NLL toward each record's target from `agml.targets.forget_targets` (a refusal for questions,
    the base model's answer with the concept banned for recommendation/list/similar prompts); a record without
    a target (not a `TargetRecord`) gets `refusal_for(record, seed, refusal_language)`."""

    refusal_language: str = "english"

    name: ClassVar[str] = "forget-targets"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_refusal_language(self.refusal_language)

    def forget_answer(self, record: PromptRecord) -> str:
        return _target_of(record) or refusal_for(record, self.seed, self.refusal_language)

    def forget_answer_ends(self, record: PromptRecord) -> bool:
        return _target_of(record) is None or getattr(record, "target_complete", True)

    def forget_term(self, model: torch.nn.Module, batch: UnlearnBatch) -> torch.Tensor:
        return -answer_logits(model, batch.forget).token_logprobs().mean()


@dataclass
class SimNPO(RepresentationObjective):
    """SimNPO on the base answers: -(2/simnpo_beta) mean logsigmoid(-(simnpo_beta/|y|) log p(y) - simnpo_gamma).

    Reference-free (no base forward); the length normalisation keeps long answers from dominating. Its own
    parameter names keep TrainConfig's NPO `beta` (0.1, far too small here) from being passed to it.
    """

    simnpo_beta: float = 2.5
    simnpo_gamma: float = 0.0

    name: ClassVar[str] = "simnpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.simnpo_beta <= 0:
            raise InputError(f"simnpo_beta must be > 0, got {self.simnpo_beta}")

    def forget_term(self, model: torch.nn.Module, batch: UnlearnBatch) -> torch.Tensor:
        from agml.representation import simnpo_loss

        out = answer_logits(model, batch.forget)
        lengths = out.per_sequence_sum(torch.ones_like(out.targets, dtype=torch.float32))
        return simnpo_loss(out.per_sequence_sum(out.token_logprobs()), lengths, self.simnpo_beta, self.simnpo_gamma)


@dataclass
class RMU(RepresentationObjective):
    """The RMU-style term alone on the base answers (forget_loss = rmu_forget), plus KL and the activation retain
    term. Defaults act at the concept's name tokens and the answer tokens."""

    rmu_weight: float = 1.0
    rmu_positions: str = "entity+answer"

    name: ClassVar[str] = "rmu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rmu_weight <= 0:
            raise InputError(f"the rmu objective needs rmu_weight > 0, got {self.rmu_weight}")

    def forget_term(self, model: torch.nn.Module, batch: UnlearnBatch) -> torch.Tensor:
        return torch.zeros((), device=next(model.parameters()).device)


OBJECTIVES.update({cls.name: cls for cls in (ForgetTargets, SimNPO, RMU)})
