"""`qagent`: questions answered by searching a passage corpus with BM25 (QAgent, arXiv 2510.08383).

The model runs the paper's protocol, one model turn per round, each ending at `</s>`
(the search) or with end-of-sequence (the answer):

    question  kaz company city?
    model     <p>works,based</p><s>kaz works</s>        plan, then up to 3 queries (`;`)
    env       <i>kaz works at mofi.</i>                 the top passage of each query
    model     <r>mofi</r><s>mofi based</s>              reflection, then search again...
    env       <i>mofi is based in lupa.</i>
    model     <r>lupa</r><a>lupa</a>                    ...or answer; at most `max_rounds` searches

The paper's tags (<plan>, <search>, <information>, <reflection>, <answer>) are cut to one
letter because a character-level model pays for every character. The env's information
blocks are observations, so they are masked out of the loss like every env turn; each
step's `info` carries the queries and the passages they retrieved, which the rewards read.

Corpus: by default a generated two-hop knowledge base (people who work at companies and
report to bosses, companies based in cities; a few thousand passages; held-out questions
ask about people no training question asks about). Any user corpus works without code:

    task:
      name: qagent
      params: {corpus: data/passages.jsonl, questions: data/train.jsonl, heldout: data/test.jsonl}

`corpus` holds one passage per line (`{"id": ..., "text": ...}`; `contents` as in the
Search-R1/FlashRAG dumps is read too), the question files `{"question": ..., "answer": ...}`.

BM25 comes from bm25s (sparse matrices over numpy, pure Python: nothing to compile, an
index of a few thousand passages builds in milliseconds and lives in the env process);
tantivy would bring a Rust index on disk, which pays off only for corpora far larger than
the env's memory.

    python -m rollfleet.tasks.qagent reader OUT [--style swapped]   # train a reader (below)
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollfleet.tasks import Example, Split, Task, TaskEnv, register_task
from rollfleet.tasks.jsonl import _read_rows, read_records

# Two-hop question types: (question suffix, first relation, second relation).
RELATIONS = {
    "works": "{a} works at {b}.",
    "reports": "{a} reports to {b}.",
    "born": "{a} was born in {b}.",
    "based": "{a} is based in {b}.",
}
QUESTIONS = {
    "company city": ("works", "based"),
    "boss birthplace": ("reports", "born"),
}
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"

_ROUND = r"<r>[^<]*</r>(?:<p>[^<]*</p>)?"
_SEARCH = r"<s>[^<;]+(?:;[^<;]+){0,2}</s>"
_ANSWER = r"<a>([^<]+)</a>"
FIRST_TURN = re.compile(rf"<p>[^<]*</p>{_SEARCH}")
LATER_SEARCH = re.compile(rf"{_ROUND}{_SEARCH}")
LATER_ANSWER = re.compile(rf"(?:{_ROUND})?{_ANSWER}")


def random_name(rng: random.Random) -> str:
    """A four-letter name: consonant, vowel, consonant, vowel."""
    return "".join(rng.choice(s) for s in (_CONSONANTS, _VOWELS) * 2)


@dataclass(frozen=True)
class Passage:
    id: str
    text: str


class KnowledgeBase:
    """The generated two-hop knowledge base: `people` people (each works at a company,
    reports to another person, was born in a city) and `companies` companies (each based
    in a city), every name four letters (consonant, vowel, consonant, vowel)."""

    def __init__(self, seed: int, people: int = 600, companies: int = 100, cities: int = 40):
        rng = random.Random(f"qagent-kb/{seed}")
        names = set()
        while len(names) < people + companies + cities:
            names.add(random_name(rng))
        names = sorted(names)
        rng.shuffle(names)
        self.people = names[:people]
        self.companies = names[people : people + companies]
        self.cities = names[people + companies :]
        # Bosses are people too, but no question asks about one: "kaz reports" would then
        # match "xyz reports to kaz." as well as kaz's own passage.
        self.bosses, self.askable = self.people[:50], self.people[50:]
        self.facts: dict[tuple[str, str], str] = {}  # (entity, relation) -> object
        for person in self.people:
            self.facts[person, "works"] = rng.choice(self.companies)
            self.facts[person, "reports"] = rng.choice([b for b in self.bosses if b != person])
            self.facts[person, "born"] = rng.choice(self.cities)
        for company in self.companies:
            self.facts[company, "based"] = rng.choice(self.cities)

    def passages(self) -> list[Passage]:
        return [
            Passage(f"{entity}-{relation}", RELATIONS[relation].format(a=entity, b=value))
            for (entity, relation), value in self.facts.items()
        ]

    def passage(self, entity: str, relation: str) -> str:
        return RELATIONS[relation].format(a=entity, b=self.facts[entity, relation])


class Index:
    """BM25 over a corpus: `search(query)` -> the top passage's text, or None when no
    word of the query is in the corpus (English stop words ignored on both sides)."""

    def __init__(self, passages: list[Passage]):
        import logging

        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs each index at DEBUG
        if not passages:
            raise ValueError("task.params.corpus: the corpus holds no passages")
        self.passages = passages
        self._bm25s = bm25s
        self._retriever = bm25s.BM25()
        self._retriever.index(self._tokenize([p.text for p in passages]), show_progress=False)

    def _tokenize(self, texts: list[str], return_ids: bool = True):
        return self._bm25s.tokenize(
            texts, stopwords="en", return_ids=return_ids, show_progress=False
        )

    def search(self, queries: list[str]) -> list[Passage | None]:
        found = []
        for words in self._tokenize(queries, return_ids=False):
            known = [w for w in words if w in self._retriever.vocab_dict]
            if not known:  # bm25s refuses a query with no word of the corpus
                found.append(None)
                continue
            ids, scores = self._retriever.retrieve([known], k=1, show_progress=False)
            found.append(self.passages[int(ids[0][0])] if scores[0][0] > 0 else None)
        return found


def read_corpus(path: str) -> list[Passage]:
    """Passages from a JSON Lines file: `text` (or `contents`) and an optional `id`."""
    passages = []
    for number, row in read_records(path, "task.params.corpus"):
        text = row.get("text", row.get("contents"))
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number}: a passage needs a string field 'text'")
        passages.append(Passage(str(row.get("id", number)), text))
    return passages


def parse_queries(action: str) -> list[str] | None:
    """The queries of a search turn's `<s>q1;q2</s>` (the last search block), or None."""
    blocks = re.findall(r"<s>([^<]*)</s>", action)
    if not blocks:
        return None
    return [q.strip() for q in blocks[-1].split(";") if q.strip()]


def parse_answer(text: str) -> str | None:
    """The answer of the last `<a>...</a>` in `text`, or None."""
    found = re.findall(_ANSWER, text)
    return found[-1].strip() if found else None


def follows_protocol(turns: list[dict[str, Any]], max_rounds: int, max_queries: int = 3) -> bool:
    """The format check: a plan and a search first, then reflection with another search
    or the answer, every search of at most `max_queries` queries, at most `max_rounds`
    searches, and the episode ending with an answer."""
    model = [t["text"] for t in turns if t["role"] == "model"]
    if len(model) < 2 or len(model) > max_rounds + 1:
        return False
    searches, answer = model[:-1], model[-1]
    if not FIRST_TURN.fullmatch(searches[0]):
        return False
    if not all(LATER_SEARCH.fullmatch(t) for t in searches[1:]):
        return False
    if any(len(parse_queries(t) or ()) > max_queries for t in searches):
        return False
    return LATER_ANSWER.fullmatch(answer.strip()) is not None


def retrieved(turns: list[dict[str, Any]]) -> list[str]:
    """The passages the env returned in an episode, in order, without repeats."""
    seen: dict[str, None] = {}
    for turn in turns:
        if turn["role"] == "env":
            for text in turn.get("info", {}).get("passages", []):
                seen.setdefault(text, None)
    return list(seen)


def reader_prompt(question: str, passages: list[str], limit: int = 4) -> str:
    """What a reader answers from: the question, then the last `limit` passages retrieved
    (the most recent last, where a two-hop search puts the answer's passage)."""
    return f"q:{question}? " + " ".join(passages[-limit:]) + "="


class SearchEnv(TaskEnv):
    """One episode: each `<s>` turn runs its queries (the first `max_queries`) against the
    index; the answer, a turn with neither, or a search past `max_rounds` ends it."""

    def __init__(self, task: QAgentTask, meta: dict[str, Any]):
        super().__init__(task, meta)
        self.rounds = 0

    def step(self, action: str) -> tuple[str, bool, dict[str, Any]]:
        if parse_answer(action) is not None:
            return "", True, {"answer": parse_answer(action)}
        queries = parse_queries(action)
        if queries is None:
            return "", True, {"error": "neither a search nor an answer"}
        if self.rounds >= self.task.max_rounds:
            return "", True, {"error": f"more than {self.task.max_rounds} search rounds"}
        self.rounds += 1
        queries = queries[: self.task.max_queries]
        found = [p for p in self.task.index.search(queries) if p is not None]
        texts = [p.text for p in found]
        return f"<i>{' '.join(texts)}</i>", False, {"queries": queries, "passages": texts}


@register_task("qagent")
class QAgentTask(Task):
    name = "qagent"
    multi_turn = True
    default_reward = "qagent_answer"
    turn_stop = ("</s>",)

    def __init__(
        self,
        seed: int = 0,
        corpus: str | None = None,
        questions: str | None = None,
        heldout: str | None = None,
        max_rounds: int = 5,
        max_queries: int = 3,
        heldout_size: int = 200,
        demo_entity_only: float = 0.5,
    ):
        if max_rounds < 1 or max_queries < 1:
            raise ValueError("task.params: max_rounds and max_queries must be at least 1")
        if (corpus is None) != (questions is None):
            raise ValueError(
                "task.params: corpus and questions go together (a user corpus needs its "
                "questions); leave both out for the generated knowledge base"
            )
        self.seed, self.max_rounds, self.max_queries = seed, max_rounds, max_queries
        if not 0 <= demo_entity_only <= 1:
            raise ValueError("task.params.demo_entity_only: a share, between 0 and 1")
        self.heldout_size, self.demo_entity_only = heldout_size, demo_entity_only
        if corpus is None:
            self.kb = KnowledgeBase(seed)
            self.index = _generated_index(seed)
            self._rows = None
            # Held-out questions ask about every fifth person, whom training never asks about.
            self._people = {
                "train": [p for i, p in enumerate(self.kb.askable) if i % 5],
                "heldout": self.kb.askable[::5],
            }
        else:
            if heldout is None:
                raise ValueError(
                    "task.params.heldout: a user corpus needs a held-out question file"
                )
            self.kb = None
            self.index = Index(read_corpus(corpus))
            self._rows = {
                split: _read_rows(path, "question", "answer", f"task.params.{field}")
                for split, field, path in (
                    ("train", "questions", questions),
                    ("heldout", "heldout", heldout),
                )
            }

    def size(self, split: Split) -> int | None:
        if self._rows is not None:
            return len(self._rows[split])
        return self.heldout_size if split == "heldout" else None

    def example(self, split: Split, index: int) -> Example:
        meta = {"max_turns": self.max_rounds + 1}
        if self._rows is not None:
            row = self._rows[split][index % len(self._rows[split])]
            return Example(
                id=f"qagent-{split}-{index}",
                prompt=f"{row['question']}?",
                answer=str(row["answer"]),
                meta={**meta, "question": row["question"]},
            )
        rng = random.Random(f"qagent/{self.seed}/{split}/{index}")
        person = rng.choice(self._people[split])
        kind = rng.choice(sorted(QUESTIONS))
        first, second = QUESTIONS[kind]
        bridge = self.kb.facts[person, first]
        answer = self.kb.facts[bridge, second]
        question = f"{person} {kind}"
        # A share of the demonstrations searches the bridge entity alone, which BM25 ties
        # with the entity's other passages (here: another passage wins), then answers from
        # memory: the bridges are few and shared, so the answers can be memorised. The
        # warm-up thus leaves good second queries to RL, and only a reward that pays for
        # retrieval (stage 2) has a reason to prefer them.
        second_query = bridge if rng.random() < self.demo_entity_only else f"{bridge} {second}"
        found = self.index.search([second_query])[0]
        return Example(
            id=f"qagent-{split}-{index}",
            prompt=f"{question}?",
            answer=answer,
            meta={**meta, "question": question},
            demonstration=(
                ("model", f"<p>{first},{second}</p><s>{person} {first}</s>"),
                ("env", f"<i>{self.kb.passage(person, first)}</i>"),
                ("model", f"<r>{bridge}</r><s>{second_query}</s>"),
                ("env", f"<i>{found.text if found else ''}</i>"),
                ("model", f"<r>{answer}</r><a>{answer}</a>"),
            ),
        )

    def open_env(self, meta: dict[str, Any]) -> SearchEnv:
        return SearchEnv(self, meta)


@functools.cache
def _generated_index(seed: int) -> Index:
    return Index(KnowledgeBase(seed).passages())


# --- readers: the frozen models of the Stage-2 reward --------------------------------------

# Both read the passages as a search finds them, the answer's passage last (content
# lookup among shuffled passages is beyond a model this small in minutes of training).
READERS = {
    # The reader the Stage-2 agent trains against: up to one distractor before the gold
    # passages.
    "qagent-reader": {"seed": 0, "hidden": 128, "layers": 4, "distractors": 1},
    # The reader swapped in at evaluation: another seed, size and data (up to three
    # distractors, and among the gold passages).
    "qagent-reader-swapped": {"seed": 1, "hidden": 96, "layers": 3, "distractors": 3},
}


class ReaderTask(Task):
    """A reader's SFT data: `reader_prompt(question, passages)` -> the answer. Every
    example invents its own names, so nothing can be memorised: a reader that knew the
    agent's facts would answer what the agent never retrieved, and its accuracy would no
    longer measure retrieval. The answer's passage comes last, after up to `distractors`
    others; the first hop's passage just before it, or, with more than one distractor,
    anywhere among them."""

    name = "qagent_reader"

    def __init__(self, seed: int, distractors: int):
        self.seed, self.distractors = seed, distractors

    def example(self, split: Split, index: int) -> Example:
        rng = random.Random(f"qagent-reader/{self.seed}/{split}/{index}")
        kind = rng.choice(sorted(QUESTIONS))
        first, second = QUESTIONS[kind]
        person, bridge, answer = (random_name(rng) for _ in range(3))
        passages = [
            RELATIONS[rng.choice(sorted(RELATIONS))].format(a=random_name(rng), b=random_name(rng))
            for _ in range(rng.randint(0, self.distractors))
        ]
        where = rng.randint(0, len(passages)) if self.distractors > 1 else len(passages)
        passages.insert(where, RELATIONS[first].format(a=person, b=bridge))
        passages.append(RELATIONS[second].format(a=bridge, b=answer))
        prompt = reader_prompt(f"{person} {kind}", passages)
        return Example(
            f"qagent-reader-{split}-{index}", prompt, answer, demonstration=(("model", answer),)
        )


def train_reader(
    folder: str | Path, name: str = "qagent-reader", steps: int = 500, on_step=None
) -> Path:
    """Create and train reader `name` (one of READERS) into `folder`: a tiny Llama taught
    to answer from passages; returns the folder. About a minute on 2 cores.

    At the warm-up's usual rate (3e-3) the copy never formed in 2,000 steps; at 1e-3 it
    forms within 200."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollfleet.models.tiny import create_tiny_model
    from rollfleet.models.warmup import warmup_sft

    config = READERS[name]
    folder = Path(folder)
    create_tiny_model(
        folder, seed=config["seed"], hidden=config["hidden"], layers=config["layers"], max_len=256
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = ReaderTask(config["seed"], config["distractors"])
    warmup_sft(
        model,
        tokenizer,
        task,
        steps=steps,
        batch_size=32,
        lr=1e-3,
        seed=config["seed"],
        on_step=on_step,
    )
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="train a QAgent reader into a model folder")
    parser.add_argument("command", choices=["reader"])
    parser.add_argument("out")
    parser.add_argument("--name", choices=sorted(READERS), default="qagent-reader")
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    train_reader(args.out, args.name, args.steps)
    print(f"reader {args.name} saved in {args.out}")
