"""Build the frozen TEST splits (agml/datasets/<slug>_test.jsonl) from the hand-written probes in benchmarks/splits/.

How the split was made (docs for the README):
- Every probe was written by hand before any unlearning setting was chosen, as a user would ask, in every category
  (paraphrase, facts, descriptions without the name, recommendation/list/similar requests, multi-turn, typos, five
  other languages, role-play, cloze). Retain neighbours are films/people/products that no training file mentions.
- A forget probe's `forbidden` list is the concept's key facts (agml/datasets/<slug>_facts.json) that its own text
  does not already contain; recommendation/list/similar probes forbid only terms that identify the concept itself
  (title, characters, signature plot terms), not the director or cast, which a good recommendation may name.
- The base model decides ONE thing: a retain probe whose greedy base answer (chat template, 64 new tokens) fails
  (no required word; for a probe without required words, a refusal) is dropped, since it would measure nothing.
  Forget probes are never filtered by the base model.
- Numbers from the run that wrote the shipped files (SmolLM2-135M-Instruct, greedy, CPU). Forget probes are all kept.
    concept       forget   retain written   retain kept (neighbour / generic rec. / general / other-language)
    inception     103      336              134 (53 / 24 / 47 / 10)   -> 202 dropped by the base model
    harry-potter  103      311              139 (53 / 26 / 50 / 10)   -> 172 dropped
    iphone        103      284              157 (75 / 25 / 47 / 10)   -> 127 dropped
  The general and other-language candidates are shared by the three concepts. The base model fails most questions
  asked in French, German, Italian or Portuguese, so only 10 of 64 such candidates are kept (each language >= 1).
  Each dropped probe and its base answer is listed in benchmarks/results/splits_build.json; the base answers are
  cached in benchmarks/results/split_base_answers.json.

Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/make_splits.py [--concepts inception harry-potter iphone]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agml.data import PromptRecord, parse_record, save_prompts  # noqa: E402

DATASETS = ROOT / "agml" / "datasets"
MODULES = {"inception": "inception_test_data", "harry-potter": "harry_potter_test_data", "iphone": "iphone_test_data"}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concepts", nargs="+", default=list(MODULES))
    args = parser.parse_args()
    from agml.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    log_path = ROOT / "benchmarks" / "results" / "splits_build.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    for slug in args.concepts:
        module = importlib.import_module(f"benchmarks.splits.{MODULES[slug]}")
        facts = json.loads((DATASETS / f"{slug}_facts.json").read_text())
        forget = forget_records(module, facts)
        retain = retain_records(module)
        answers = cached_answers(model, tokenizer, retain, slug)
        kept = [r for r, a in zip(retain, answers, strict=True) if base_passes(r, a)]
        dropped = [{"prompt": r.prompt, "base_answer": a} for r, a in zip(retain, answers, strict=True)
                   if not base_passes(r, a)]
        save_prompts(forget + kept, DATASETS / f"{slug}_test.jsonl")
        by_category: dict[str, int] = {}
        for r in kept:
            by_category[r.category] = by_category.get(r.category, 0) + 1
        log[slug] = {"forget_written": len(forget), "retain_written": len(retain), "retain_kept": len(kept),
                     "retain_kept_by_category": by_category, "dropped": dropped}
        print(f"{slug}: forget {len(forget)}; retain written {len(retain)}, kept {len(kept)} {by_category}")
    log_path.write_text(json.dumps(log, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
