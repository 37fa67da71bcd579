"""Write agml/datasets/general_knowledge_mc.jsonl from benchmarks/splits/general_mc_data.py, and (--score) check
that the base model is clearly above chance on it.

Scoring is cloze-style log-likelihood: the question is the user turn and each choice is scored as the assistant's
answer (chat template, answer tokens plus end-of-turn); the predicted choice has the highest summed log-probability
("acc") or the highest mean log-probability per token ("acc_norm"). Chance is 25%. Nothing is dropped by the score.

Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/make_general_mc.py [--score]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.splits.general_mc_data import ITEMS  # noqa: E402

OUTPUT = ROOT / "agml" / "datasets" / "general_knowledge_mc.jsonl"
SEED = 14


def build_items() -> list[dict]:
    """Choices shuffled with a fixed seed, so the right answer's position is spread over 0..3."""
    rng = random.Random(SEED)
    items = []
    for domain, question, correct, wrong in ITEMS:
        choices = [correct, *wrong]
        rng.shuffle(choices)
        items.append({"question": question, "choices": choices, "answer": choices.index(correct), "domain": domain})
    return items


def score(items: list[dict]) -> dict:
    from agml.data import build_example
    from agml.evaluation import sequence_logprobs
    from agml.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    examples = [build_example(tokenizer, [{"role": "user", "content": item["question"]}], choice)
                for item in items for choice in item["choices"]]
    totals, counts = sequence_logprobs(model, tokenizer, examples, batch_size=32)
    result: dict = {"n": len(items), "by_domain": {}}
    hits = {"acc": [], "acc_norm": []}
    for i, item in enumerate(items):
        rows = range(4 * i, 4 * i + 4)
        summed = [totals[r] for r in rows]
        mean = [totals[r] / counts[r] for r in rows]
        for name, values in (("acc", summed), ("acc_norm", mean)):
            ok = max(range(4), key=values.__getitem__) == item["answer"]
            hits[name].append(ok)
            result["by_domain"].setdefault(item["domain"], {"acc": [], "acc_norm": []})[name].append(ok)
    for name, oks in hits.items():
        result[name] = sum(oks) / len(oks)
    result["by_domain"] = {d: {k: round(sum(v) / len(v), 3) for k, v in s.items()} | {"n": len(s["acc"])}
                           for d, s in sorted(result["by_domain"].items())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--score", action="store_true", help="score the base model and write benchmarks/results")
    args = parser.parse_args()
    items = build_items()
    OUTPUT.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    print(f"wrote {len(items)} items to {OUTPUT.relative_to(ROOT)}")
    if args.score:
        result = score(items)
        path = ROOT / "benchmarks" / "results" / "general_mc_base.json"
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
