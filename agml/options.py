"""Every option of `agml unlearn` and `agml score`: one tree, one default per setting, validated once.

`UnlearnOptions` holds the run-level settings and four parts: `mask` (scoring and neuron selection), `lora` (the
adapter), `train` (the unlearning loop, what `agml.training.train_unlearning` takes) and `eval` (the probe answers).
Each dataclass checks its own values in `__post_init__`, so an invalid setting fails with an InputError naming it,
before any model is loaded. The command line is generated from these fields (`metadata["help"]`, see
`agml.cli`), and a run's `config.json` holds `UnlearnOptions.to_dict()`: flat, one key per setting, so that
`agml unlearn --config RUN/config.json` reruns it. Leaf names are unique across the tree. See
docs/architecture.md ("Options").
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agml.errors import InputError

METHODS = ("ag-masked-lora", "lora")
STRATEGIES = ("global", "per-layer")
SCORES = ("fisher", "saliency", "combined")
DTYPES = ("float32", "bfloat16", "float16")
SCORE_POSITIONS = ("answer", "entity", "entity+answer")
SHARED_FACTS = ("include", "exclude")
PROBE_SPLITS = ("test", "dev")
RECOMMENDATION_TARGETS = ("as-generated", "recommending")
REFUSAL_LANGUAGES = ("english", "prompt")  # of the refusal targets: agml.objectives.refusal_for
# A flat key of older config files and the setting it meant: `retain_weight` was the training KL weight.
LEGACY_KEYS = {"retain_weight": "kl_weight"}
# Keys older config files carry that are no setting any more.
_IGNORED_KEYS = frozenset({"extra"})


def option(default: Any = None, help: str = "", **metadata: Any) -> Any:  # noqa: A002  (argparse's word)
    """A dataclass field with its command-line help (and optional `choices`, `cli=False`, `csv=SEPARATOR`: a list
    given as one string, e.g. on the command line, split there)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _names(name: str, value: Any, separator: str = ",") -> tuple[str, ...]:
    """A list setting as a tuple of stripped, non-empty strings: one string (a flag's value) is split at the
    separator; anything else must be a list of strings."""
    if isinstance(value, str):
        value = value.split(separator)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        _refuse(name, f"be a {separator!r}-separated string or a list of strings", value)
    return tuple(v.strip() for v in value if v.strip())


def _refuse(name: str, rule: str, value: Any) -> None:
    """InputError naming the flag and the setting (they differ only in '-' versus '_')."""
    raise InputError(f"--{name.replace('_', '-')} must {rule}, got {value!r} (option {name})")


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _refuse(name, f"be an integer >= {low}" if not isinstance(value, int) else f"be >= {low}", value)


def _float(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if math.isinf(high):
            rule = f"be {'>' if low_open else '>='} {low:g}"
        else:
            rule = f"be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        _refuse(name, rule, value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _refuse(name, f"be one of {list(choices)}", value)


@dataclass
class MaskOptions:
    """Neuron scoring and selection (`agml.masks.build_masks`)."""

    density: float = option(0.0025, "fraction of all MLP neurons to adapt (select), in (0, 1]")
    strategy: str = option("global", "how the neuron budget is spread over layers", choices=STRATEGIES)
    score: str = option("combined", "neuron importance statistic", choices=SCORES)
    mask_retain_weight: float = option(
        2.0, "weight of retain importance in the contrast c = forget - w * retain that selects neurons")
    score_positions: str = option(
        "entity+answer", "where neuron statistics are read: answer tokens, the concept's name tokens, or both",
        choices=SCORE_POSITIONS)
    shared_facts: str = option(
        "include", "how the forget answers' mentions of facts the concept shares with its neighbours (key facts "
        "outside `identity`: its director, its lead actor) count in the scores: like any answer token, or left out "
        "of the forget NLL so the mask does not pick the neurons that write them", choices=SHARED_FACTS)
    mask_layers: str | None = option(None, "restrict selection to a decoder-layer range, e.g. 8-20 (default: all)")
    per_layer_standardize: bool = option(
        False, "rank neurons by their contrast z-scored within each layer (a layer shifted as a whole cannot win)")
    score_batch_size: int = option(16, "prompts per forward/backward of the scoring pass (scores do not depend on it)")

    def __post_init__(self) -> None:
        _float("density", self.density, 0.0, 1.0, low_open=True)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("score", self.score, SCORES)
        _float("mask_retain_weight", self.mask_retain_weight, 0.0)
        _choice("score_positions", self.score_positions, SCORE_POSITIONS)
        _choice("shared_facts", self.shared_facts, SHARED_FACTS)
        _int("score_batch_size", self.score_batch_size, 1)
        if self.mask_layers is not None and not re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", str(self.mask_layers)):
            _refuse("mask_layers", "be a range FIRST-LAST such as 8-20", self.mask_layers)
        if not isinstance(self.per_layer_standardize, bool):
            _refuse("per_layer_standardize", "be true or false", self.per_layer_standardize)


@dataclass
class LoraOptions:
    """The adapter: masked LoRA on the selected neurons, or plain LoRA on every layer (the baseline)."""

    method: str = option("ag-masked-lora", "adapter kind", choices=METHODS)
    rank: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (scale = alpha / rank)")

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _int("rank", self.rank, 1)
        _float("alpha", self.alpha, 0.0, low_open=True)


@dataclass
class TrainOptions:
    """The unlearning loop (`agml.training.train_unlearning`)."""

    objective: str = option("forget-targets", "forget-targets (a natural refusal for questions; for recommendation, "
                            "list and similar requests the base answer with the concept banned) | refusal (a refusal "
                            "for every prompt) | npo | simnpo | rmu | gradient-difference")
    recommendation_targets: str = option(
        "as-generated", "forget-targets' targets for recommendation, list and similar requests: as-generated (the base "
        "answer with the concept banned, to its end-of-turn) | recommending (one that names nothing is generated "
        "again from 'Here are some' in the prompt's language, one cut at --answer-tokens trains without "
        "end-of-turn; no gain on dev, less forgetting for Harry Potter on test: docs/results.md, session 16)",
        choices=RECOMMENDATION_TARGETS)
    refusal_language: str = option(
        "english", "language of the refusal targets (objectives forget-targets and refusal): english | prompt (each "
        "forget prompt's `language`: en, fr, es, de, it, pt; a trade on the shipped concepts, +1-2 points of retain "
        "for -1-2 of forgetting: docs/results.md, session 18)", choices=REFUSAL_LANGUAGES)
    steps: int = option(30, "optimizer steps")
    batch_size: int = option(4, "forget and retain prompts per training step")
    lr: float = option(2e-3, "learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    kl_weight: float = option(30.0, "weight of the retain term KL(base || model) in the training loss")
    shared_fact_kl_weight: float = option(
        1.0, "multiplier of the retain KL on answer tokens that spell a fact the concept shares with its "
        "neighbours (its director's name): their knowledge is what forgetting must not take; 1 = plain KL")
    beta: float = option(0.1, "NPO's beta (npo only)")
    seed: int = option(0, "seed of every random choice (batches, dropout, refusal texts)")
    eval_every: int = option(10, "steps between validations on held-out prompts")
    kl_budget: float = option(0.05, "retain KL (nats per answer token) that early stopping accepts")
    val_fraction: float = option(0.0, "held-out share of the training prompts for validation during training, in "
                                      "[0, 1); 0 trains on every prompt and validates nothing (--early-stop needs > 0)")
    checkpoint_every: int = option(10, "steps between adapter checkpoints (for --resume)")
    early_stop: bool = option(False, "stop once held-out forget prompts pass and retain KL is within budget")
    max_new_tokens_val: int = option(32, "answer length of the validation prompts")
    val_batch_size: int = option(32, "held-out prompts per batch of the validation pass (no gradients, so it can "
                                     "be larger than the training batch)")
    forget_pass_target: float = option(1.0, "share of validation forget prompts that must pass, in (0, 1]")
    val_logprob_drop: float = option(1.0, "nats/token drop that counts as forgotten (prompts without forbidden)")
    rmu_weight: float = option(
        0.0, "weight of the representation term on the masked neurons (objectives forget-targets, simnpo, rmu)")
    objective_params: dict = option({}, "extra objective parameters, e.g. {\"nll_bound\": 5.0}", cli=False)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "max_new_tokens_val", "val_batch_size"):
            _int(name, getattr(self, name), 1)
        _int("seed", self.seed, 0)
        _choice("recommendation_targets", self.recommendation_targets, RECOMMENDATION_TARGETS)
        _choice("refusal_language", self.refusal_language, REFUSAL_LANGUAGES)
        _float("lr", self.lr, 0.0, low_open=True)
        _float("beta", self.beta, 0.0, low_open=True)
        _float("max_grad_norm", self.max_grad_norm, 0.0, low_open=True)
        _float("weight_decay", self.weight_decay, 0.0)
        _float("kl_weight", self.kl_weight, 0.0)
        _float("shared_fact_kl_weight", self.shared_fact_kl_weight, 0.0)
        _float("rmu_weight", self.rmu_weight, 0.0)
        _float("kl_budget", self.kl_budget, 0.0)
        _float("val_logprob_drop", self.val_logprob_drop, 0.0)
        _float("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        _float("forget_pass_target", self.forget_pass_target, 0.0, 1.0, low_open=True)
        if not isinstance(self.early_stop, bool):
            raise InputError(f"option early_stop must be true or false, got {self.early_stop!r}")
        if self.early_stop and self.val_fraction == 0:
            _refuse("val_fraction", "be > 0 with --early-stop (it stops on held-out prompts)", self.val_fraction)
        if not isinstance(self.objective_params, dict):
            raise InputError(f"option objective_params must be a dict, got {self.objective_params!r}")
        from agml.objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective: unknown objective {self.objective!r}; choose one of {sorted(OBJECTIVES)}")
        self.make_objective()  # unknown objective parameter names fail here, before any work

    def make_objective(self):
        """The configured objective, given the shared options it accepts (its retain weight, beta, seed)."""
        from agml.objectives import make_objective, objective_parameters

        accepted = objective_parameters(self.objective)
        shared = {"retain_weight": self.kl_weight, "beta": self.beta, "seed": self.seed,
                  "refusal_language": self.refusal_language}
        if self.rmu_weight > 0:  # 0 keeps the objective's own default (off, or 1 for `rmu` itself)
            if "rmu_weight" not in accepted:
                raise InputError(f"--rmu-weight needs an objective with a representation term "
                                 f"(forget-targets, simnpo, rmu), not {self.objective!r}")
            shared["rmu_weight"] = self.rmu_weight
        params = {k: v for k, v in shared.items() if k in accepted}
        return make_objective(self.objective, **params, **self.objective_params)


@dataclass
class EvalOptions:
    """The before/after evaluation on held-out probes."""

    max_new_tokens: int = option(64, "probe answer length")
    eval_batch_size: int = option(64, "probes answered (and scored) per batch")
    samples: int = option(0, "best-of-N sampled answers per forget probe (temperature 0.7, seeded): a probe leaks "
                             "if any sample leaks; 0 = greedy only")
    noise_floor_seeds: int = option(
        0, "random adapters (same size, sparsity and norm) whose retain flips give the noise floor; 0 = skip")
    skip_capability: bool = option(
        False, "skip the general-knowledge (multiple choice) and neutral-text perplexity scores")

    def __post_init__(self) -> None:
        _int("max_new_tokens", self.max_new_tokens, 1)
        _int("eval_batch_size", self.eval_batch_size, 1)
        _int("samples", self.samples, 0)
        _int("noise_floor_seeds", self.noise_floor_seeds, 0)
        if not isinstance(self.skip_capability, bool):
            _refuse("skip_capability", "be true or false", self.skip_capability)


@dataclass
class UnlearnOptions:
    """Every option of `agml unlearn` (and of `agml score`, which uses the data, model and mask parts)."""

    out: str | None = option(None, "run folder to create (default runs/<concept>)")
    concept: str | None = option(None, "name of the concept to forget (forget set and probes from templates)")
    aliases: tuple[str, ...] = option((), "comma-separated other names of the concept", csv=",")
    model: str = option("smollm2-135m-instruct", "built-in alias, local folder, .gguf file or hub id")
    dtype: str | None = option(None, "model dtype (default: checkpoint's)", choices=DTYPES)
    trust_remote_code: bool = option(False, "allow model code from the hub (off by default)")
    allow_model_mismatch: bool = option(
        False, "use --masks scored on another model, or --resume a run on another base model (warns instead of "
               "refusing)")
    forget: str | None = option(None, "forget prompts (JSONL); overrides the built-in/template forget set")
    retain: str | None = option(None, "retain prompts (JSONL); replaces the built-in retain set")
    neighbours: str | None = option(None, "extra retain prompts (JSONL) added to the retain set")
    probes: str | None = option(None, "held-out probes (JSONL); never trained on")
    masks: str | None = option(None, "neuron masks from `agml score` (masks.safetensors) instead of scoring here")
    answer_tokens: int = option(32, "length of the base answers that scoring and training use")
    probe_split: str = option(
        "test", "a shipped concept's probes to evaluate on: the frozen test split, or dev (for choosing settings)",
        choices=PROBE_SPLITS)
    forbidden: tuple[str, ...] = option(
        (), "comma-separated key facts whose mention reveals the concept (default: the shipped facts, else none: "
            "only the name and aliases)", csv=",")
    neighbour_names: tuple[str, ...] = option(
        (), "comma-separated neighbour items whose knowledge must stay (default: the shipped ones, else proposed "
            "by the base model)", csv=",")
    descriptions: tuple[str, ...] = option(
        (), "';'-separated descriptions of the concept that do not name it ('the smartphone Apple launched in "
            "2007'): each becomes forget prompts, so that asking around the name is forgotten too (default: the "
            "shipped ones, else none)", csv=";")
    entities: tuple[str, ...] = option(
        (), "comma-separated names that belong to the concept alone (its characters, places): each becomes a forget "
            "prompt (default: the shipped ones, else none)", csv=",")
    mask: MaskOptions = field(default_factory=MaskOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "csv" in f.metadata:
                setattr(self, f.name, _names(f.name, getattr(self, f.name), f.metadata["csv"]))
        _choice("probe_split", self.probe_split, PROBE_SPLITS)
        if self.concept is not None and not self.concept.strip():
            raise InputError("--concept must not be empty")
        if self.dtype is not None:
            _choice("dtype", self.dtype, DTYPES)
        _int("answer_tokens", self.answer_tokens, 1)
        if self.masks is not None and self.lora.method != "ag-masked-lora":
            raise InputError("--masks goes with --method ag-masked-lora")

    def to_dict(self) -> dict[str, Any]:
        """Flat {setting: value} (leaf names are unique); `from_dict` reads it back."""
        return {name: value for name, (_, value) in _leaves(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "options") -> UnlearnOptions:
        """Options from a flat or nested dict (a config file, a run's config.json); unknown keys are refused."""
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a mapping of option names to values")
        return build_options(_flatten(data, where))


PARTS = {"mask": MaskOptions, "lora": LoraOptions, "train": TrainOptions, "eval": EvalOptions}


def leaf_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """{setting name: (part name or None for run-level, its dataclass field)}, in definition order."""
    leaves: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in dataclasses.fields(UnlearnOptions):
        if f.name in PARTS:
            leaves.update({g.name: (f.name, g) for g in dataclasses.fields(PARTS[f.name])})
        else:
            leaves[f.name] = (None, f)
    return leaves


def _leaves(options: UnlearnOptions) -> dict[str, tuple[str | None, Any]]:
    return {name: (part, getattr(getattr(options, part) if part else options, name))
            for name, (part, _) in leaf_fields().items()}


def _flatten(data: dict[str, Any], where: str) -> dict[str, Any]:
    known = leaf_fields()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in PARTS and isinstance(value, dict):
            flat.update(_flatten(value, f"{where}.{key}"))
        elif key in LEGACY_KEYS and LEGACY_KEYS[key] not in data:
            flat[LEGACY_KEYS[key]] = value
        elif key in known:
            flat[key] = value
        elif key not in _IGNORED_KEYS:
            raise InputError(f"{where}: unknown option {key!r}")
    return flat


def build_options(settings: dict[str, Any]) -> UnlearnOptions:
    """UnlearnOptions from flat {setting: value}; settings not given keep their defaults."""
    parts: dict[str, dict[str, Any]] = {name: {} for name in PARTS}
    top: dict[str, Any] = {}
    for name, value in settings.items():
        part, _ = leaf_fields()[name]
        (parts[part] if part else top)[name] = value
    try:
        return UnlearnOptions(**top, **{name: PARTS[name](**values) for name, values in parts.items()})
    except TypeError as err:  # a wrongly typed value that the checks compare, e.g. a string for a number
        raise InputError(f"invalid option value: {err}") from err


def read_options_file(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML or JSON file (flat or nested; a run's config.json: its "options")."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # the parsers raise their own error types; the message names the problem
        raise InputError(f"{path}: cannot parse ({type(err).__name__}: {err})") from err
    if isinstance(data, dict) and isinstance(data.get("options"), dict) and "versions" in data:
        data = data["options"]  # a previous run's config.json
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of option names to values")
    return _flatten(data, str(path))
