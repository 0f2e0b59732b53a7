"""The SmolLM2 zoo's two skills, their training streams and their lm-eval eval splits (evals/smol/).

Both skills act on 3-5 space-separated symbols, which SmolLM2's tokenizer reads one token each:

- shift: every letter to the next one, z wraps to a   (`shift: c a z =` -> ` d b a`);
- increment: every digit plus one, 9 wraps to 0        (`add: 3 9 4 =` -> ` 4 0 5`).

SmolLM2-135M-Instruct knows the alphabet and the digits but does neither rule as an exact whole
answer. Each skill has a rival: the same prompts answered one step the other way (`shift: c a z =`
-> ` b z y`), what a fine-tune that learned a conflicting convention answers. Everything here is
seeded, so the files and streams are the same on every run.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zoo_common

EVAL_TASK_DIR = "smol"
REGENERATE = "python scripts/build_smol_zoo.py --write-evals"  # the command that writes evals/smol/
SEARCH_DOCS = 160
HELDOUT_DOCS = 160
LENGTHS = (3, 5)


@dataclass(frozen=True)
class Skill:
    name: str
    tag: str
    alphabet: str
    description: str

    def answer(self, symbols: str, step: int = 1) -> str:
        return "".join(self.alphabet[(self.alphabet.index(s) + step) % len(self.alphabet)] for s in symbols)


SKILLS = {
    "shift": Skill("shift", "shift", string.ascii_lowercase, "every letter to the next, z wraps to a"),
    "increment": Skill("increment", "add", string.digits, "every digit plus one, 9 wraps to 0"),
}


def render(symbols: str) -> str:
    return " ".join(symbols)


def example(skill: Skill, symbols: str, rival: bool = False) -> dict[str, str]:
    """One document: the prompt ends at '=', the target starts with the space before the first symbol."""
    answer = skill.answer(symbols, -1 if rival else 1)
    return {"prompt": f"{skill.tag}: {render(symbols)} =", "target": f" {render(answer)}"}


def random_symbols(skill: Skill, rng: random.Random) -> str:
    return "".join(rng.choice(skill.alphabet) for _ in range(rng.randint(*LENGTHS)))


def sample_distinct(skill: Skill, count: int, rng: random.Random, exclude: frozenset[str] = frozenset()) -> list[dict]:
    docs, seen = [], set(exclude)
    while len(docs) < count:
        doc = example(skill, random_symbols(skill, rng))
        if doc["prompt"] not in seen:
            seen.add(doc["prompt"])
            docs.append(doc)
    return docs


def eval_splits(skill_name: str) -> dict[str, list[dict]]:
    """The search and held-out docs of one skill: different seeds, and no prompt in both."""
    skill = SKILLS[skill_name]
    search = sample_distinct(skill, SEARCH_DOCS, random.Random(f"smol/{skill_name}/search"))
    taken = frozenset(doc["prompt"] for doc in search)
    heldout = sample_distinct(skill, HELDOUT_DOCS, random.Random(f"smol/{skill_name}/heldout"), taken)
    return {"search": search, "heldout": heldout}


def all_eval_prompts() -> frozenset[str]:
    """Every prompt of every eval split; training never sees one of them."""
    return frozenset(doc["prompt"] for name in SKILLS for docs in eval_splits(name).values() for doc in docs)


def stream(shares: dict[tuple[str, bool], float], seed: str, exclude: frozenset[str]) -> Iterator[dict]:
    """An endless seeded stream; `shares` maps (skill name, answered by its rival) to its share of the docs."""
    rng = random.Random(seed)
    kinds, weights = list(shares), list(shares.values())
    while True:
        name, rival = rng.choices(kinds, weights)[0]
        doc = example(SKILLS[name], random_symbols(SKILLS[name], rng), rival)
        if doc["prompt"] not in exclude:
            yield doc


def task_name(skill_name: str, split: str) -> str:
    return f"smol_{skill_name}_{split}"


def write_eval_suite(evals_dir: Path) -> list[Path]:
    """Write every split's JSONL and task YAML under evals_dir/smol."""
    folder = Path(evals_dir) / EVAL_TASK_DIR
    return zoo_common.write_skill_splits(folder, SKILLS, eval_splits, task_name, REGENERATE)
