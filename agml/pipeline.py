"""The jobs: `agml unlearn` (prompts -> answers -> scores -> masks -> masked LoRA -> training -> report) and
`agml score` (prompts -> answers -> scores -> masks), which build masks the same way from the same answers.

Everything that can be checked is checked by the options themselves (`agml.options`), `check_inputs` and
`resolve_data` before the model is loaded; all output goes to RUN.partial and is renamed to RUN only when the run is
complete. See docs/architecture.md ("Pipeline").
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from agml import adapter_check, distributed, fingerprint, ownership, preflight, probe_defaults, runs
from agml import resume as resume_check
from agml.architecture import mlp_dims
from agml.data import PromptRecord, conversation_key, load_prompts
from agml.errors import InputError
from agml.io import atomic_write_json
from agml.masks import NeuronMasks, budget_shortfall
from agml.options import UnlearnOptions

BUILTIN_DEMO = "Inception"


def check_inputs(options: UnlearnOptions) -> None:
    """File checks that need no model: a --masks file must be agml masks (values were checked by the options)."""
    if options.out is None:
        raise InputError("no output folder given (--out)")
    if options.masks is not None:
        NeuronMasks.load(options.masks)  # a missing or foreign file is refused before any work


@dataclass
class RunData:
    forget: list[PromptRecord]
    retain: list[PromptRecord]
    probes: list[PromptRecord]
    concept: str
    terms: tuple[str, ...]
    facts: dict = dataclasses.field(default_factory=dict)  # what the judges count as revealing the concept
    split: str = "custom"  # which probes: "test" (frozen), "dev", "template" or "custom" (the user's file)


def _load_typed(path: str, kind: str) -> list[PromptRecord]:
    records = load_prompts(path, default_type=kind)
    wrong = [r.source for r in records if r.type != kind]
    if wrong:
        raise InputError(f"{wrong[0]}: expected a {kind} prompt in this file, got another type")
    return records


def concept_facts(name: str, options: UnlearnOptions) -> dict:
    """The judges' facts of a concept: the shipped ones (agml/datasets/<slug>_facts.json) for a shipped concept,
    else the name and aliases alone; --forbidden replaces the key facts, --neighbour-names the neighbours,
    --descriptions and --entities the shipped descriptions and entities (forget prompts, `concept_forget_set`)."""
    from agml import concepts
    from agml.judges import check_facts

    slug = concepts.concept_slug(name)
    facts = (concepts.load_facts(slug) if slug in concepts.shipped_concepts()
             else {"name": name, "aliases": [], "facts": [], "fuzzy": [], "neighbours": [], "languages": []})
    facts["aliases"] = list(dict.fromkeys([*facts.get("aliases", []), *options.aliases]))
    if options.forbidden:
        facts["facts"] = list(options.forbidden)
        facts.pop("identity", None)  # the user's list is the whole list
    if options.neighbour_names:
        facts["neighbours"] = list(options.neighbour_names)
    if options.descriptions:
        facts["descriptions"] = list(options.descriptions)
    if options.entities:
        facts["entities"] = list(options.entities)
    return check_facts(facts, where=f"facts of {name!r}")


def _shipped_probes(slug: str, split: str) -> list[PromptRecord] | None:
    """A shipped concept's frozen test split or its dev split; None when agml ships none for it."""
    from agml import concepts

    # Inception's dev split predates the naming scheme (it was the demo's only probe file).
    filename = f"{slug}_test.jsonl" if split == "test" else (
        "inception_probes.jsonl" if slug == "inception" else f"{slug}_dev.jsonl")
    if not (concepts.datasets_folder() / filename).is_file():
        return None
    return load_prompts(concepts.dataset_path(filename))


def resolve_data(options: UnlearnOptions) -> RunData:
    """Built-in demo, a concept given by name, or user files (which override any part)."""
    from agml import concepts

    split = "custom"
    if options.concept is None and options.forget is None:
        forget, retain, _dev = concepts.builtin_inception()
        facts = concept_facts(BUILTIN_DEMO, options)
        probes, split = _shipped_probes("inception", options.probe_split), options.probe_split
    elif options.concept is not None:
        name = options.concept.strip()
        facts = concept_facts(name, options)
        forget = concepts.concept_forget_set(name, tuple(facts["aliases"]), facts.get("descriptions", ()),
                                             facts.get("entities", ()))
        retain = concepts.general_retain_set()
        if facts["neighbours"]:
            retain = retain + concepts.neighbour_retain_set(facts["neighbours"])
        probes = _shipped_probes(concepts.concept_slug(name), options.probe_split)
        split = options.probe_split
        if probes is None:  # a concept agml ships nothing for: probes from held-out templates
            probes = concepts.concept_probes(name, tuple(facts["aliases"])) + concepts.general_retain_probes()
            split = "template"
    else:
        facts = concept_facts(Path(options.forget).stem, options)
        forget, retain = [], concepts.general_retain_set()
        probes = concepts.general_retain_probes()
    if options.forget:
        forget = _load_typed(options.forget, "forget")
    if options.retain:
        retain = _load_typed(options.retain, "retain")
    if options.neighbours:
        retain = retain + _load_typed(options.neighbours, "retain")
    if options.probes:
        probes, split = load_prompts(options.probes), "custom"
    if not forget:
        raise InputError("the forget set is empty")
    if not retain:
        raise InputError("the retain set is empty")
    _check_held_out(forget + retain, probes)
    terms = (facts["name"], *facts["aliases"])
    return RunData(forget, retain, probes, facts["name"], terms, facts, split)


def _without_concept(retain: list[PromptRecord], terms: tuple[str, ...], log) -> list[PromptRecord]:
    """Retain prompts whose base answer names the concept would teach the model to keep it: drop them."""
    lowered = [t.lower() for t in terms]
    kept = [r for r in retain if not any(t in r.answer.lower() for t in lowered)]
    if not kept:
        raise InputError("every retain prompt's base answer names the concept; give retain prompts that do not")
    if log is not None and len(kept) < len(retain):
        log(f"dropped {len(retain) - len(kept)} retain prompt(s) whose base answer names the concept")
    return kept


def _check_held_out(training: list[PromptRecord], probes: list[PromptRecord]) -> None:
    seen = {conversation_key(r) for r in training}
    leaked = [p.source for p in probes if conversation_key(p) in seen]
    if leaked:
        # All of them at once (the first few by place): a user fixing a probe file should not have to rerun per line.
        shown = ", ".join(str(source) for source in leaked[:5]) + (", ..." if len(leaked) > 5 else "")
        raise InputError(f"{len(leaked)} probe(s) are also training prompts ({shown}); probes must be held out: "
                         "reword or remove them")


def answer_data(model, tokenizer, options: UnlearnOptions, data: RunData, log) -> RunData:
    """The base model's answers (`answer_tokens` long) to the forget and retain prompts; retain prompts whose
    answer names the concept are dropped."""
    from agml import answer_cache
    from agml.scoring import answer_records

    data = _with_proposed_neighbours(model, tokenizer, options, data, log)
    # The base model answers the same prompts in every run of a concept: the answer cache keeps them.
    cache_key = answer_cache.base_fingerprint(model, tokenizer)
    forget = answer_records(model, tokenizer, data.forget, options.answer_tokens, desc="forget answers",
                            fingerprint=cache_key)
    retain = answer_records(model, tokenizer, data.retain, options.answer_tokens, desc="retain answers",
                            fingerprint=cache_key)
    retain = _without_concept(retain, data.terms, log)
    return dataclasses.replace(data, forget=forget, retain=retain)


def _with_proposed_neighbours(model, tokenizer, options: UnlearnOptions, data: RunData, log) -> RunData:
    """A concept agml ships nothing for and the user named no neighbours of: ask the base model for similar items
    and keep what they are about in the retain set, so that only the concept separates forget from retain."""
    from agml import concepts

    if options.concept is None or data.facts.get("neighbours") or options.retain:
        return data
    names = concepts.propose_neighbours(model, tokenizer, data.concept, 20, tuple(data.facts["aliases"]))
    if not names:
        # Measured: SmolLM2-135M lists only Star Wars' own films when asked for films like it (docs/results.md).
        if log is not None:
            log(f"warning: the base model proposed no neighbours of {data.concept!r} (its lists named only the "
                "concept itself, or nothing); the retain set holds general prompts only, so items like it may be "
                "forgotten too: name some with --neighbour-names")
        return data
    if log is not None:
        log(f"neighbours proposed by the base model (kept in the retain set): {', '.join(names)}")
    facts = {**data.facts, "neighbours": names}
    return dataclasses.replace(data, facts=facts, retain=data.retain + concepts.neighbour_retain_set(names))


def with_targets(model, tokenizer, options: UnlearnOptions, data: RunData) -> RunData:
    """Forget records with their training targets by prompt kind when the objective trains toward targets:
    questions -> a natural refusal; recommendation/list/similar requests -> the base model's own answer with the
    concept's names and key facts banned (it recommends something else). Deterministic, so a resumed run
    rebuilds the same targets."""
    from agml import answer_cache
    from agml.targets import forget_targets

    if options.train.objective != "forget-targets":
        return data
    banned = (*data.terms, *data.facts.get("identity", data.facts.get("facts", [])))
    forget = forget_targets(model, tokenizer, data.forget, banned, options.answer_tokens,
                            concept_names=data.terms, seed=options.train.seed,
                            recommending=options.train.recommendation_targets == "recommending",
                            refusal_language=options.train.refusal_language,
                            fingerprint=answer_cache.base_fingerprint(model, tokenizer))
    return dataclasses.replace(data, forget=forget)


def training_options(options: UnlearnOptions, tokenizer, data: RunData):
    """The train part, given the concept's name tokens where the objective's representation term reads them."""
    from agml.entities import entity_token_ids
    from agml.objectives import objective_parameters

    train = options.train
    if "concept_token_ids" in objective_parameters(train.objective) and \
            "concept_token_ids" not in train.objective_params:
        params = {**train.objective_params, "concept_token_ids": entity_token_ids(tokenizer, data.terms)}
        train = dataclasses.replace(train, objective_params=params)
    return train


def shared_facts(facts: dict, terms: Sequence[str]) -> list[str]:
    """Key facts the concept shares with its neighbours: the facts outside its `identity` list and its names
    (Inception: Nolan, DiCaprio, 2010, ...). Empty without an `identity` list, e.g. for a user's own `--forbidden`."""
    if "identity" not in facts:
        return []
    own = {t.lower() for t in (*facts["identity"], *terms)}
    return [fact for fact in facts.get("facts", []) if fact.lower() not in own]


def _shared_fact_token_ids(tokenizer, data: RunData, wanted: bool) -> list[list[int]] | tuple[()]:
    """`entity_token_ids` of `shared_facts` when an option asks for them (and there are any), else ()."""
    from agml.entities import entity_token_ids

    shared = shared_facts(data.facts, data.terms) if wanted else []
    return entity_token_ids(tokenizer, shared) if shared else ()


def score_and_select(model, tokenizer, options: UnlearnOptions, data: RunData):
    """(NeuronScores, NeuronMasks) from the answered forget and retain records, as the mask options say."""
    from agml import answer_cache
    from agml.entities import entity_token_ids
    from agml.masks import build_masks, layer_range
    from agml.scoring import NeuronScores, score_records_at

    mask = options.mask
    neighbours = data.facts.get("neighbours", [])
    concept_ids = entity_token_ids(tokenizer, data.terms)
    neighbour_ids = entity_token_ids(tokenizer, neighbours) if neighbours else ()
    shared_ids = _shared_fact_token_ids(tokenizer, data, mask.shared_facts == "exclude")
    # The scores are a base-model output like its answers: every run on the same prompts reads them from the cache.
    key = {"forget": [(r.messages, r.answer) for r in data.forget],
           "retain": [(r.messages, r.answer) for r in data.retain],
           "concept": concept_ids, "neighbours": neighbour_ids, "positions": mask.score_positions,
           "batch_size": mask.score_batch_size, **({"shared": shared_ids} if shared_ids else {})}
    scores = answer_cache.cached_file(
        answer_cache.base_fingerprint(model, tokenizer), "scores", key,
        lambda: score_records_at(model, tokenizer, data.forget, data.retain, concept_ids,
                                 positions=mask.score_positions, retain_entity_token_ids=neighbour_ids,
                                 batch_size=mask.score_batch_size, progress=distributed.is_main(),
                                 shared_token_ids=shared_ids),
        save=lambda value, path: value.save(path), load=NeuronScores.load)
    layers = None if mask.mask_layers is None else layer_range(mask.mask_layers, scores.num_layers)
    masks = build_masks(scores, density=mask.density, strategy=mask.strategy, score=mask.score, layers=layers,
                        retain_weight=mask.mask_retain_weight, per_layer_standardize=mask.per_layer_standardize)
    return scores, masks


def _log_mask_shortfall(masks: NeuronMasks, log) -> None:
    line = budget_shortfall(masks)  # a note when the mask is short of its budget, a warning when it is tiny
    if line:
        log(line)


def attach_adapter(model, tokenizer, options: UnlearnOptions, data: RunData, work: Path, log):
    """Score and mask (ag-masked-lora) or plain LoRA on every layer (the baseline)."""
    from agml.adapters import apply_lora, apply_masked_lora

    targets = ("gate_proj", "up_proj", "down_proj")
    if options.lora.method == "lora":
        return apply_lora(model, r=options.lora.rank, alpha=options.lora.alpha, targets=targets), None
    if options.masks:  # masks from `agml score` (checked against this model before the run started)
        masks = NeuronMasks.load(options.masks)
        if distributed.is_main():
            masks.save(work / "masks.safetensors")
        return apply_masked_lora(model, masks, r=options.lora.rank, alpha=options.lora.alpha, targets=targets), masks
    from agml.plots import plot_heatmap
    from agml.scoring import NeuronScores

    scores_path, masks_path = work / "scores.safetensors", work / "masks.safetensors"
    if masks_path.is_file() and scores_path.is_file():  # a resumed run keeps the masks it trained with
        scores, masks = NeuronScores.load(scores_path), NeuronMasks.load(masks_path)
    else:
        start = time.perf_counter()
        scores, masks = score_and_select(model, tokenizer, options, data)
        if distributed.is_main():
            scores.save(scores_path)
            masks.save(masks_path)
            log(f"selected {masks.total} neurons in {len(masks)} layers ({time.perf_counter() - start:.1f}s scoring)")
            _log_mask_shortfall(masks, log)
    if distributed.is_main():
        plot_heatmap(scores, masks, work / "plots" / "heatmap.png")
    return apply_masked_lora(model, masks, r=options.lora.rank, alpha=options.lora.alpha, targets=targets), masks


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


class StageClock:
    """Wall seconds of each pipeline stage, in order (report.json's `stage_seconds`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


def run_unlearn(options: UnlearnOptions, force: bool = False, resume: bool = False, log=print) -> Path:
    """Run the whole job; returns the finished run folder."""
    check_inputs(options)
    if not resume:
        ownership.check_replaceable(options.out, force)
    data = resolve_data(options)
    data = dataclasses.replace(data, probes=probe_defaults.with_default_forbidden(data.probes, data.terms, log))

    from agml import answer_cache
    from agml.adapters import export_baked, save_adapter
    from agml.evaluation import evaluate
    from agml.layers import AGML_CONFIG
    from agml.models import load_model
    from agml.reporting import write_report
    from agml.training import train_unlearning

    started = time.perf_counter()
    clock = StageClock()
    torch.manual_seed(options.train.seed)
    model, tokenizer = load_model(options.model, dtype=options.dtype, trust_remote_code=options.trust_remote_code)
    if options.masks:
        NeuronMasks.load(options.masks).validate_for(*mlp_dims(model))
        fingerprint.warn_or_refuse_masks(options.masks, model, options.allow_model_mismatch, log)
    if resume:
        resume_check.check_same_base_model(options.out, model, options.allow_model_mismatch, log)
    model_record = fingerprint.model_record(model)
    preflight.check_context(model, tokenizer, data.forget + data.retain + data.probes,
                            {"--max-new-tokens": options.eval.max_new_tokens,
                             "--answer-tokens": options.answer_tokens})
    # Under `accelerate launch` every process runs this function; only the main process writes files.
    main = distributed.is_main()
    work = ownership.start_run(options.out, resume=resume) if main else runs.partial_dir(options.out)
    if main:
        runs.write_config(work, options.to_dict(), {"name": data.concept, "terms": list(data.terms)})
        fingerprint.add_to_json_file(work / runs.CONFIG_FILE, model_record)
    distributed.barrier()

    forget = runs.load_records(work, "forget") if resume else None
    retain = runs.load_records(work, "retain") if resume else None
    if forget is None or retain is None:
        answered = answer_data(model, tokenizer, options, data, log if main else None)
        forget, retain = answered.forget, answered.retain
        if main:
            runs.save_records(work, "forget", forget)
            runs.save_records(work, "retain", retain)
            runs.save_records(work, "probes", data.probes)
    data = dataclasses.replace(data, forget=forget, retain=retain)
    if main:
        atomic_write_json(work / runs.DATA_DIR / runs.FACTS_FILE, data.facts)
    clock.lap("load and base answers")

    peft_model, masks = attach_adapter(model, tokenizer, options, data, work, log)
    clock.lap("scoring and masks")
    data = with_targets(peft_model, tokenizer, options, data)
    clock.lap("training targets")
    trainable, total = trainable_parameters(peft_model)
    if main:
        log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    result = train_unlearning(peft_model, tokenizer, data.forget, data.retain,
                              training_options(options, tokenizer, data),
                              checkpoint_dir=work / "checkpoint", resume=resume, progress=main,
                              shared_token_ids=_shared_fact_token_ids(
                                  tokenizer, data, options.train.shared_fact_kl_weight != 1.0),
                              fingerprint=answer_cache.base_fingerprint(peft_model, tokenizer))
    adapter_check.check_trained_adapter(peft_model)
    clock.lap("training")
    evaluation = evaluate(peft_model, tokenizer, data.probes, max_new_tokens=options.eval.max_new_tokens,
                          batch_size=options.eval.eval_batch_size, concept_terms=data.terms, facts=data.facts,
                          samples=options.eval.samples, seed=options.train.seed,
                          capability=not options.eval.skip_capability,
                          noise_floor_seeds=options.eval.noise_floor_seeds, split=data.split, progress=main)
    clock.lap("evaluation")
    if main:
        save_adapter(peft_model, work / runs.ADAPTER_DIR, overwrite=True)
        fingerprint.add_to_json_file(work / runs.ADAPTER_DIR / AGML_CONFIG, model_record)
        export_baked(peft_model, work / runs.BAKED_DIR, overwrite=True)
        write_report(work, options=options.to_dict(), evaluation=evaluation, training=result,
                     masks=masks, parameters={"trainable": trainable, "total": total},
                     seconds=time.perf_counter() - started, concept=data.concept, stages=clock.seconds)
        shutil.rmtree(work / "checkpoint", ignore_errors=True)  # only needed to resume an unfinished run
        ownership.finish(work, options.out)
    distributed.barrier()
    return Path(options.out)


def run_score(options: UnlearnOptions, force: bool = False, log=print) -> Path:
    """`agml score`: answers, neuron scores and masks (as `agml unlearn` builds them) written to `options.out`."""
    check_inputs(options)
    preflight.check_score_out(options.out, force)
    data = resolve_data(options)

    from agml.models import load_model
    from agml.plots import plot_heatmap

    started = time.perf_counter()
    torch.manual_seed(options.train.seed)
    model, tokenizer = load_model(options.model, dtype=options.dtype, trust_remote_code=options.trust_remote_code)
    data = answer_data(model, tokenizer, options, data, log if distributed.is_main() else None)
    scores, masks = score_and_select(model, tokenizer, options, data)
    masks.meta[fingerprint.MASKS_KEY] = fingerprint.model_record(model)
    if not distributed.is_main():  # under accelerate launch every process scored its shard; one writes
        return Path(options.out)
    work = ownership.start_run(options.out)
    scores.save(work / "scores.safetensors")
    masks.save(work / "masks.safetensors")
    plot_heatmap(scores, masks, work / "plots" / "heatmap.png")
    out = ownership.finish(work, options.out)
    busiest = sorted(masks.items(), key=lambda item: (-item[1].numel(), item[0]))[:5]
    log(f"scored {scores.forget_tokens} forget / {scores.retain_tokens} retain answer tokens over "
        f"{scores.num_layers} layers x {scores.intermediate_size} neurons in {time.perf_counter() - started:.1f}s")
    log(f"selected {masks.total} neurons ({options.mask.score}, {options.mask.strategy}) in {len(masks)} layers; "
        "most in: " + ", ".join(f"layer {layer}: {ids.numel()}" for layer, ids in busiest))
    _log_mask_shortfall(masks, log)
    log(f"written to {Path(out)}: scores.safetensors, masks.safetensors, plots/heatmap.png")
    return Path(out)
