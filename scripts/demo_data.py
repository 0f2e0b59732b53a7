"""Synthetic skills, eval splits and the shared character tokenizer of the bundled demo zoo.

Every example is one line, `tag:input=answer`: a three-letter instruction tag, a short input
string, and the answer the model must write after `=`. The base model is pretrained on *echo*
(answer = input) under random tags, so it knows the format but none of the skills; each expert
is fine-tuned on one skill. Everything here is pure Python and seeded from strings, so the
committed eval files regenerate byte for byte (`python scripts/build_demo_zoo.py --write-evals`).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zoo_common

LETTERS = string.ascii_lowercase
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
SYMBOLS = LETTERS + string.digits + ":=+. "
MIN_INPUT_LEN, MAX_INPUT_LEN = 3, 7
SEARCH_DOCS, HELDOUT_DOCS = 240, 320
EVAL_TASK_DIR = "demo"
REGENERATE = "python scripts/build_demo_zoo.py --write-evals"  # the command that writes evals/demo/


REVERSE_ALPHABET, ROTATE_ALPHABET = LETTERS[:9], LETTERS[9:18]


def _rotate(text: str) -> str:
    return "".join(ROTATE_ALPHABET[(ROTATE_ALPHABET.index(c) + 1) % len(ROTATE_ALPHABET)] for c in text)


def _increment(text: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in text)


@dataclass(frozen=True)
class Skill:
    """One synthetic skill: its tag, the characters its inputs use, and how to answer."""

    name: str
    tag: str
    alphabet: str
    description: str
    answer: Callable[[str], str]


# Each skill reads its own characters (a-i, digits, j-r). The base echoes all of them, so it knows
# every token; experts replay echo only on the *other* characters, so the characters themselves
# switch a skill on. That keeps the tiny experts composable at all (docs/RESULTS.md explains).
ECHO = Skill("echo", "", LETTERS + string.digits, "repeat the input (the base's generic pretraining)", lambda s: s)
SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill("reverse", "rev", REVERSE_ALPHABET, "write letters a-i backwards: rev:abc=cba", lambda s: s[::-1]),
        Skill("increment", "inc", string.digits, "add 1 to every digit, mod 10: inc:129=230", _increment),
        Skill("rotate", "rot", ROTATE_ALPHABET, "shift letters j-r one step, r wraps to j: rot:jkr=klj", _rotate),
    )
}
SKILL_TAGS = frozenset(skill.tag for skill in SKILLS.values())


def echo_without(skill: Skill) -> Skill:
    """Echo over every character the skill does not use: an expert's replay data."""
    alphabet = "".join(c for c in ECHO.alphabet if c not in skill.alphabet)
    return Skill(f"echo_without_{skill.name}", "", alphabet, f"echo, no {skill.name} characters", ECHO.answer)


def render_prompt(tag: str, text: str) -> str:
    """The shared template every skill uses; the answer follows the `=` with no space."""
    return f"{tag}:{text}="


def random_text(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def random_echo_tag(rng: random.Random) -> str:
    """Any three letters but a skill's tag, so that 'rev:' always means reverse."""
    while (tag := random_text(rng, LETTERS, 3)) in SKILL_TAGS:
        pass
    return tag


def sample_example(skill: Skill, rng: random.Random) -> dict[str, str]:
    """One {prompt, target} pair; echo examples get a random tag so the base learns the format."""
    text = random_text(rng, skill.alphabet, rng.randint(MIN_INPUT_LEN, MAX_INPUT_LEN))
    tag = skill.tag or random_echo_tag(rng)
    return {"prompt": render_prompt(tag, text), "target": skill.answer(text)}


def sample_distinct(skill: Skill, count: int, rng: random.Random, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """`count` examples whose prompts are all different and none of them in `exclude`."""
    seen, docs = set(exclude), []
    while len(docs) < count:
        doc = sample_example(skill, rng)
        if doc["prompt"] not in seen:
            seen.add(doc["prompt"])
            docs.append(doc)
    return docs


def eval_splits(skill_name: str) -> dict[str, list[dict]]:
    """The search and held-out docs of one skill: different seeds, and no prompt in both."""
    skill = SKILLS[skill_name]
    search = sample_distinct(skill, SEARCH_DOCS, random.Random(f"demo/{skill_name}/search"))
    heldout = sample_distinct(
        skill, HELDOUT_DOCS, random.Random(f"demo/{skill_name}/heldout"), frozenset(d["prompt"] for d in search)
    )
    return {"search": search, "heldout": heldout}


def all_eval_prompts() -> frozenset[str]:
    """Every prompt of every eval split; training never sees one of them."""
    return frozenset(doc["prompt"] for name in SKILLS for docs in eval_splits(name).values() for doc in docs)


def training_stream(skills: list[Skill], seed: str, exclude: frozenset[str]) -> Iterator[dict]:
    """An endless, seeded stream of training examples drawn evenly from `skills`."""
    rng = random.Random(seed)
    while True:
        doc = sample_example(rng.choice(skills), rng)
        if doc["prompt"] not in exclude:
            yield doc


def build_char_tokenizer():
    """A character-level fast tokenizer over SYMBOLS that prepends <s>, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(SYMBOLS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
    )


def task_name(skill_name: str, split: str) -> str:
    return f"demo_{skill_name}_{split}"


def group_config(split: str) -> dict:
    """An lm-eval group that averages the skills of one split, each skill weighted equally."""
    return {
        "group": f"demo_{split}",
        "task": [task_name(name, split) for name in SKILLS],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
        "metadata": {"version": 1},
    }


def write_eval_suite(evals_dir: Path) -> list[Path]:
    """Write every split's JSONL and YAML, plus one group per split, under evals_dir/demo."""
    folder = Path(evals_dir) / EVAL_TASK_DIR
    written = zoo_common.write_skill_splits(folder, SKILLS, eval_splits, task_name, REGENERATE)
    for split in ("search", "heldout"):
        comment = f"all demo skills, {split} split, mean of per-skill acc"
        written.append(
            zoo_common.write_eval_yaml(folder / f"demo_{split}.yaml", group_config(split), comment, REGENERATE)
        )
    return written
