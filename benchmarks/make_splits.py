"""Build the frozen TEST splits (agml/datasets/<slug>_test.jsonl) and the DEV splits of the by-name concepts
(agml/datasets/<slug>_dev.jsonl) from the hand-written probes in benchmarks/splits/.

How the splits were made (docs for the README):
- Every probe was written by hand, as a user would ask, in every category (paraphrase, facts, descriptions without
  the name, recommendation/list/similar requests, multi-turn, typos, five other languages, role-play, cloze); the
  test probes before any unlearning setting was chosen. Retain neighbours are films/people/products/works that no
  training file mentions.
- The dev split (--split dev; <module>_dev_data.py) is for choosing settings; the test split is only for the final
  numbers. Dev probes are other probes in the same categories, none a near-duplicate of a test probe, a training
  prompt or a relearning example (tests/test_splits.py), and their neighbours are items the test split does not ask
  about. Inception's dev split is the older hand-made agml/datasets/inception_probes.jsonl; it is not built here.
- A forget probe's `forbidden` list is the concept's key facts (agml/datasets/<slug>_facts.json) that its own text
  does not already contain; recommendation/list/similar probes forbid only terms that identify the concept itself
  (title, characters, signature plot terms), not the director or cast, which a good recommendation may name.
- The base model decides ONE thing: a retain probe whose greedy base answer (chat template, 64 new tokens) fails
  (no required word; for a probe without required words, a refusal) is dropped, since it would measure nothing.
  Forget probes are never filtered by the base model.
- Numbers from the runs that wrote the shipped files (SmolLM2-135M-Instruct, greedy, CPU). Forget probes are all kept.
    split  concept       forget   retain written   retain kept (neighbour / generic rec. / general / other-language)
    test   inception     103      336              134 (53 / 24 / 47 / 10)   -> 202 dropped by the base model
    test   harry-potter  103      311              139 (53 / 26 / 50 / 10)   -> 172 dropped
    test   iphone        103      284              157 (75 / 25 / 47 / 10)   -> 127 dropped
    dev    harry-potter  60       205              80 (41 / 19 / 13 / 7)     -> 125 dropped
    dev    iphone        52       157              72 (33 / 20 / 12 / 7)     -> 85 dropped
  The general and other-language candidates are shared by the concepts of a split. The base model fails most
  questions asked in French, German, Italian or Portuguese, so only 10 of 64 such test candidates are kept (each
  language >= 1) and 7 of 62 dev candidates (French 3, Spanish 2, German 1, Italian 1, Portuguese none of 27: the
  base model echoes or garbles every Portuguese question, so the dev retain set has no Portuguese probe).
  Each dropped probe and its base answer is listed in benchmarks/results/splits_build.json (keys "<slug>" for test,
  "<slug> dev" for dev); the base answers are cached in benchmarks/results/split_base_answers.json.

Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/make_splits.py [--split {test,dev}] [--concepts SLUG ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agml.data import PromptRecord, parse_record, save_prompts  # noqa: E402

DATASETS = ROOT / "agml" / "datasets"
SPLITS = ("test", "dev")
# Data module stem of each concept: benchmarks/splits/<stem>_<split>_data.py.
STEMS = {"inception": "inception", "harry-potter": "harry_potter", "iphone": "iphone"}
# Concepts whose split is not built here, and why.
NOT_BUILT = {("inception", "dev"): "Inception's dev split is the hand-made agml/datasets/inception_probes.jsonl"}
# An answer that only declines is no pass for a retain probe, even one without required words.
REFUSAL = re.compile(
    r"\b(i (do not|don't|cannot|can't|am not able to|am unable to)|i'm (not able|unable|sorry|afraid)|as an ai|"
    r"i have no (information|suggestions))\b"
)


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)


def forbidden_terms(facts: dict, kind: str, language: str, prompt) -> list[str]:
    """The concept's identifying terms that the probe's own text does not contain."""
    pool = facts["facts"] if kind in ("question", "cloze") else facts["identity"]
    pool = list(pool) + list(facts.get("question_extra", [])) * (kind in ("question", "cloze"))
    pool += facts.get("language_extra", {}).get(language, [])
    text = _text(prompt).lower()
    return [t for t in dict.fromkeys(pool) if t.strip() not in text]


def forget_records(module, facts: dict) -> list[PromptRecord]:
    records = []
    for category, kind, language, prompt in module.FORGET:
        obj = {"type": "forget", "category": category, "forbidden": forbidden_terms(facts, kind, language, prompt)}
        obj["prompt" if isinstance(prompt, str) else "messages"] = prompt
        if kind != "question":
            obj["kind"] = kind
        if language != "en":
            obj["language"] = language
        records.append(parse_record(obj, f"{module.__name__}:forget"))
    return records


def retain_records(module) -> list[PromptRecord]:
    objs = [{"prompt": p, "type": "retain", "category": "neighbour", "required": r} for p, r in module.NEIGHBOUR]
    objs += [{"prompt": p, "type": "retain", "category": "generic-recommendation", "kind": "recommendation"}
             for p in module.GENERIC_RECOMMENDATION]
    for category, language, prompt, required in module.GENERAL:
        obj = {"prompt": prompt, "type": "retain", "category": category, "required": required, "kind": "general"}
        if language != "en":
            obj["language"] = language
        objs.append(obj)
    return [parse_record(o, f"{module.__name__}:retain") for o in objs]


def base_passes(record: PromptRecord, answer: str) -> bool:
    text = answer.lower()
    if REFUSAL.search(text) or not text.strip():
        return False
    return not record.required or any(word in text for word in record.required)


def cached_answers(model, tokenizer, records: list[PromptRecord], desc: str) -> list[str]:
    """Greedy base answers (chat template, 64 new tokens); greedy decoding is deterministic, so answers are kept in
    benchmarks/results/split_base_answers.json and only new prompts are generated."""
    from agml.generation import greedy_answers

    path = ROOT / "benchmarks" / "results" / "split_base_answers.json"
    cache = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    keys = [json.dumps(list(r.messages), ensure_ascii=False) for r in records]
    missing = [k for k in dict.fromkeys(keys) if k not in cache]
    if missing:
        new = greedy_answers(model, tokenizer, [json.loads(k) for k in missing], max_new_tokens=64, desc=desc)
        cache.update(zip(missing, new, strict=True))
        path.write_text(json.dumps(cache, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    return [cache[k] for k in keys]


def split_concepts(split: str, requested: list[str] | None) -> list[str]:
    """The concepts to build: all that have a data module for this split, or the requested ones."""
    if requested is None:
        return [slug for slug in STEMS if (slug, split) not in NOT_BUILT]
    refused = [f"{slug}: {NOT_BUILT[slug, split]}" for slug in requested if (slug, split) in NOT_BUILT]
    if refused:
        raise SystemExit(f"no {split} split is built for " + "; ".join(refused))
    return requested


def build_split(model, tokenizer, slug: str, split: str) -> dict:
    """Write agml/datasets/<slug>_<split>.jsonl (every forget probe, the retain probes the base model passes) and
    return its build log."""
    module = importlib.import_module(f"benchmarks.splits.{STEMS[slug]}_{split}_data")
    facts = json.loads((DATASETS / f"{slug}_facts.json").read_text())
    forget = forget_records(module, facts)
    retain = retain_records(module)
    answers = cached_answers(model, tokenizer, retain, f"{slug} {split}")
    passed = [base_passes(r, a) for r, a in zip(retain, answers, strict=True)]
    kept = [r for r, ok in zip(retain, passed, strict=True) if ok]
    dropped = [{"prompt": r.prompt, "base_answer": a} for r, a, ok in zip(retain, answers, passed, strict=True)
               if not ok]
    save_prompts(forget + kept, DATASETS / f"{slug}_{split}.jsonl")
    by_category = dict(Counter(r.category for r in kept))
    print(f"{slug} {split}: forget {len(forget)}; retain written {len(retain)}, kept {len(kept)} {by_category}")
    return {"forget_written": len(forget), "retain_written": len(retain), "retain_kept": len(kept),
            "retain_kept_by_category": by_category, "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--concepts", nargs="+", choices=list(STEMS))
    args = parser.parse_args()
    concepts = split_concepts(args.split, args.concepts)
    from agml.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    log_path = ROOT / "benchmarks" / "results" / "splits_build.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    for slug in concepts:
        # The test split's log keeps its original key (the concept's slug).
        log[slug if args.split == "test" else f"{slug} {args.split}"] = build_split(model, tokenizer, slug, args.split)
    log_path.write_text(json.dumps(log, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
