"""Add contrastive TRAINING prompts to agml/datasets/inception_forget.jsonl and inception_retain.jsonl (issue #15).

Every forget template below is filled once with "Inception" and once per neighbour film from
agml/datasets/inception_facts.json, so that only the film separates a forget prompt from a retain prompt.
Recommendation, list and "similar" prompts carry their `kind` (their training target is a recommendation that
avoids the concept, not a refusal). Retain also gets generic recommendation requests and general questions in
the forget set's languages. None of these wordings is used by the dev or test probes (tests/test_splits.py).

Idempotent: records already in the files are kept once; the generated ones are (re)added after them.
Run: PYTHONPATH=$PWD python benchmarks/make_contrastive.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agml.concepts import name_typos  # noqa: E402
from agml.data import PromptRecord, load_prompts, parse_record, save_prompts  # noqa: E402
from benchmarks.make_splits import forbidden_terms  # noqa: E402

DATASETS = ROOT / "agml" / "datasets"
# Enough to pair every forget template with several films while keeping the retain set small enough to train fast.
NEIGHBOURS_PER_TEMPLATE = 6

# (category, kind, language, template); {film} is the title. Multi-turn templates are tuples of turns.
FILM_TEMPLATES = [
    ("director", "question", "en", "Which director made the film {film}?"),
    ("cast", "question", "en", "Who are the lead actors of {film}?"),
    ("year", "question", "en", "In which year was {film} released in theatres?"),
    ("plot", "question", "en", "Walk me through the story of {film}."),
    ("plot", "question", "en", "How does {film} end? Spoilers are fine."),
    ("opinion", "question", "en", "Why do critics praise {film}?"),
    ("other-language", "question", "fr", "Raconte-moi l'histoire du film {film}."),
    ("other-language", "question", "es", "¿Quién dirigió la película {film}?"),
    ("other-language", "question", "de", "Wer spielt mit im Film {film}?"),
    ("other-language", "question", "it", "Qual è la trama del film {film}?"),
    ("other-language", "question", "pt", "Em que ano estreou o filme {film}?"),
    ("role-play", "question", "en", "You are a cinema usher. A guest asks what {film} is about. Reply briefly."),
    ("role-play", "question", "en", "Play a film historian on the radio and introduce {film} to listeners."),
    ("multi-turn", "question", "en", ("I'm planning a movie night with {film}.", "That sounds like fun!",
                                      "Remind me, what happens in it and who stars?")),
    ("multi-turn", "question", "en", ("Have you seen {film}?", "I know it well.", "Who made it, and when?")),
    ("similar", "similar", "en", "Suggest three films in the spirit of {film}."),
    ("similar", "similar", "en", "My favourite film is {film}. What should I watch next?"),
]
TYPO_TEMPLATES = [("typo", "question", "en", "whats the film {typo} about"),
                  ("typo", "question", "en", "Who starred in the movie {typo}?")]
# Descriptions without the title: the forget one, and neighbour ones built the same way.
DESCRIPTION_TEMPLATE = "Which film is this: {description}?"
FORGET_DESCRIPTIONS = [
    "a team of specialists enters a businessman's dreams to plant an idea",
    "an extractor who cannot go home to his children takes one last job inside layered dreams",
]
NEIGHBOUR_DESCRIPTIONS = {
    "Titanic": "a poor artist and a rich girl fall in love on a doomed ocean liner",
    "The Matrix": "a hacker learns that the world is a computer simulation",
    "Interstellar": "astronauts travel through a wormhole to find a new home for humanity",
    "Jurassic Park": "cloned dinosaurs escape in an island theme park",
    "The Dark Knight": "Batman faces the Joker in Gotham City",
    "Memento": "a man with short-term memory loss hunts his wife's killer using tattoos and notes",
    "The Prestige": "two rival stage magicians in Victorian London try to outdo each other",
    "Shutter Island": "a US marshal investigates a disappearance at an island psychiatric hospital",
    "Back to the Future": "a teenager travels to 1955 in a DeLorean time machine",
    "Avatar": "a paralysed marine joins the Na'vi on the moon Pandora",
}
# Requests that would surface Inception, asked without its name (forget, kind set) ...
FORGET_REQUESTS = [
    ("recommendation", "recommendation", "en", "Recommend a film about entering other people's dreams."),
    ("recommendation", "recommendation", "en", "I want a heist film with layers of dreams. What should I watch?"),
    ("list", "list", "en", "Give me a list of famous films about dreams and reality."),
    ("list", "list", "en", "Which films did Christopher Nolan direct between 2005 and 2015?"),
    ("list", "list", "en", "Name the science fiction films Leonardo DiCaprio has starred in."),
    ("recommendation", "recommendation", "fr", "Conseille-moi un film sur les rêves partagés."),
    ("list", "list", "es", "¿Qué películas de ciencia ficción con Leonardo DiCaprio conoces?"),
    ("recommendation", "recommendation", "de", "Empfiehl mir einen Film über Träume in Träumen."),
    ("list", "list", "it", "Elenca i film di fantascienza più famosi del 2010."),
]
# ... and the same sorts of requests in other genres (retain).
GENERIC_REQUESTS = [
    ("recommendation", "en", "Suggest a {genre} film I can watch this weekend."),
    ("list", "en", "Give me a list of famous {genre} films."),
    ("recommendation", "fr", "Conseille-moi un bon film {genre_fr}."),
    ("recommendation", "es", "Recomiéndame una película {genre_es}."),
]
GENRES = [("comedy", "comique", "de comedia"), ("horror", "d'horreur", "de terror"),
          ("animated", "d'animation", "de animación"), ("western", "western", "del oeste"),
          ("romantic", "romantique", "romántica"), ("war", "de guerre", "bélica"),
          ("musical", "musical", "musical"), ("crime", "policier", "policíaca")]
GENERAL_OTHER_LANGUAGES = [
    ("fr", "Quel est le plus long fleuve de France ?"), ("fr", "Qui a peint La Joconde ?"),
    ("fr", "Combien font sept fois huit ?"), ("es", "¿Cuál es el río más largo de España?"),
    ("es", "¿Quién pintó el Guernica?"), ("es", "¿Cuántas patas tiene un perro?"),
    ("de", "Wer hat die Neunte Sinfonie komponiert?"), ("de", "Welcher Fluss fließt durch Wien?"),
    ("it", "Chi ha dipinto la Gioconda?"), ("it", "Qual è il fiume più lungo d'Italia?"),
    ("pt", "Qual é o maior rio do Brasil?"), ("pt", "Quem escreveu Os Lusíadas?"),
]


def _record(obj: dict, category: str, kind: str, language: str, template, **names) -> PromptRecord:
    if isinstance(template, str):
        obj["prompt"] = template.format(**names)
    else:
        obj["messages"] = [{"role": "user" if i % 2 == 0 else "assistant", "content": t.format(**names)}
                           for i, t in enumerate(template)]
    obj["category"] = category
    if kind != "question":
        obj["kind"] = kind
    if language != "en":
        obj["language"] = language
    return parse_record(obj, "make_contrastive")


def _forget(facts: dict, category: str, kind: str, language: str, template, **names) -> PromptRecord:
    probe = _record({"type": "forget"}, category, kind, language, template, **names)
    text = probe.to_json().get("prompt") or " ".join(m["content"] for m in probe.messages)
    obj = {**probe.to_json(), "forbidden": forbidden_terms(facts, kind, language, text)}
    return parse_record(obj, "make_contrastive")


def build(facts: dict) -> tuple[list[PromptRecord], list[PromptRecord]]:
    forget, retain = [], []
    neighbours = facts["neighbours"]
    for index, (category, kind, language, template) in enumerate(FILM_TEMPLATES):
        forget.append(_forget(facts, category, kind, language, template, film="Inception"))
        # Each template gets NEIGHBOURS_PER_TEMPLATE films, rotating so that every neighbour is used.
        films = [neighbours[(index * NEIGHBOURS_PER_TEMPLATE + j) % len(neighbours)]
                 for j in range(NEIGHBOURS_PER_TEMPLATE)]
        retain += [_record({"type": "retain"}, category, kind, language, template, film=film) for film in films]
    for (category, kind, language, template), typo in zip(TYPO_TEMPLATES, ("Inceptin", "Incpetion"), strict=True):
        forget.append(_forget(facts, category, kind, language, template, typo=typo))
        retain += [_record({"type": "retain"}, category, kind, language, template, typo=t)
                   for film in neighbours[:NEIGHBOURS_PER_TEMPLATE] for t in name_typos(film, 1)]
    forget += [_forget(facts, "description", "question", "en", DESCRIPTION_TEMPLATE, description=d)
               for d in FORGET_DESCRIPTIONS]
    retain += [_record({"type": "retain"}, "description", "question", "en", DESCRIPTION_TEMPLATE, description=d)
               for d in NEIGHBOUR_DESCRIPTIONS.values()]
    forget += [_forget(facts, category, kind, language, text) for category, kind, language, text in FORGET_REQUESTS]
    for kind, language, template in GENERIC_REQUESTS:
        retain += [_record({"type": "retain"}, "generic-recommendation", kind, language, template,
                           genre=en, genre_fr=fr, genre_es=es) for en, fr, es in GENRES]
    retain += [_record({"type": "retain"}, "general", "general", language, text)
               for language, text in GENERAL_OTHER_LANGUAGES]
    return forget, retain


def _key(record: PromptRecord) -> tuple:
    return tuple((m["role"], " ".join(m["content"].lower().split())) for m in record.messages)


def _merge(path: Path, generated: list[PromptRecord]) -> int:
    keys = {_key(r) for r in generated}
    kept = [r for r in load_prompts(path) if _key(r) not in keys]
    save_prompts(kept + generated, path)
    return len(kept)


def main() -> None:
    facts = json.loads((DATASETS / "inception_facts.json").read_text())
    forget, retain = build(facts)
    seed_forget = _merge(DATASETS / "inception_forget.jsonl", forget)
    seed_retain = _merge(DATASETS / "inception_retain.jsonl", retain)
    print(f"forget: {seed_forget} seed + {len(forget)} contrastive; retain: {seed_retain} seed + {len(retain)}")


if __name__ == "__main__":
    main()
