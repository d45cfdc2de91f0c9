"""RecGPT-V2's task: predict the tags of a user's next items, by a team of agents.

Tags are two characters, a category letter and a number (`c4`: tag 4 of category c;
8 categories of 5 tags). An item carries two tags of one category, written as the
category and both numbers (`c24`: tags c2 and c4). A user has two interest categories
and, in each, three tags they like; their history is 6 items, most from their interests
(mostly liked tags), some noise. The target is the tags of their next 3 items, drawn the
same way, so a good prediction reads the history. Agents answer sets, in sorted order.

One episode is five turns of one policy, each its own agent (the `agents` episode runner
and the env here coordinate them; each agent's turn is a segment of the trajectory):

    planner   plan:a13 c25 a34 f12 c23 a14>          -> ac        two intents
    expert1   exp1:a:a13 c25 ...>                    -> a1a3a4    tags for intent 1
    expert2   exp2:c:a13 c25 ...>                    -> c2c3c5    tags for intent 2
    expert3   exp3:ac:a13 c25 ...>                   -> a1a3c2    tags for both
    arbiter   arb:a13 c25 ...=a1a3a4;c2c3c5;a1a3c2>  -> a1a3a4c2  the final top 4

    task = make_task("recgpt", seed=0)
    ex = task.example("train", 0)
    ex.prompt, ex.answer       # the planner's prompt; the target tags ('a1a3c2c5a4')
    task.sft_examples(ex)      # the teacher's turn for each agent (warm-up SFT)

The teacher is history counting: the two most frequent categories, each expert's most
frequent tags of its intent, the arbiter's most backed tags. `train_align_model` makes
the alignment reward's small reward model (`builtin:recgpt-align`, trained by the reward
service on its first start, as QAgent's readers are): it judges whether a tag fits a
history (its category occurs there).

    python -m rollfleet.tasks.recgpt align OUT    # the reward model into folder OUT
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollfleet.tasks import Example, Split, Task, TaskEnv, register_task

CATEGORIES = "abcdefgh"
TAG_NUMBERS = "12345"
HISTORY_ITEMS, FUTURE_ITEMS = 6, 3
EXPERTS = 3  # expert1: the first intent, expert2: the second, expert3: both
AGENTS = ("planner", *(f"expert{k}" for k in range(1, EXPERTS + 1)), "arbiter")
_TAG = re.compile(rf"[{CATEGORIES}][{TAG_NUMBERS}]")


def parse_tags(text: str) -> list[str] | None:
    """The tags of an agent's answer (`a1a3c2`), or None when it is anything else."""
    text = text.strip()
    if not text or len(text) % 2 or not _TAG.fullmatch(text[:2]):
        return None
    tags = [text[i : i + 2] for i in range(0, len(text), 2)]
    return tags if all(_TAG.fullmatch(t) for t in tags) else None


def parse_intents(text: str) -> list[str] | None:
    """The planner's intents (`ac`: categories a and c), or None."""
    text = text.strip()
    if not text or any(c not in CATEGORIES for c in text):
        return None
    return list(text)


def tag_distance(a: str, b: str) -> float:
    """0 for the same tag, 0.5 for two tags of one category, 1 otherwise (the tags'
    embedding distance in the paper)."""
    return 0.0 if a == b else 0.5 if a[0] == b[0] else 1.0


def diversity(tags: list[str]) -> float:
    """Mean pairwise distance of the tags (0 for fewer than two)."""
    pairs = [(a, b) for i, a in enumerate(tags) for b in tags[i + 1 :]]
    return sum(tag_distance(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


def recall(predicted: list[str], target: list[str]) -> float:
    """Share of the target tags the prediction holds (the paper's tag hit rate)."""
    return len(set(predicted) & set(target)) / len(set(target)) if target else 0.0


@dataclass(frozen=True)
class User:
    interests: tuple[str, str]
    liked: dict[str, tuple[str, ...]]  # category -> its three liked tags
    history: tuple[tuple[str, str], ...]
    future: tuple[tuple[str, str], ...]

    @property
    def history_text(self) -> str:
        return " ".join(a + b[1] for a, b in self.history)

    @property
    def target(self) -> list[str]:
        return list(dict.fromkeys(t for item in self.future for t in item))


def make_user(rng: random.Random, noise: float) -> User:
    interests = tuple(rng.sample(CATEGORIES, 2))
    liked = {c: tuple(c + n for n in rng.sample(TAG_NUMBERS, 3)) for c in interests}

    def item() -> tuple[str, str]:
        if rng.random() < noise:
            c = rng.choice(CATEGORIES)
            return tuple(sorted(c + n for n in rng.sample(TAG_NUMBERS, 2)))
        c = interests[0] if rng.random() < 0.6 else interests[1]
        tags = (
            rng.sample(liked[c], 2)
            if rng.random() < 0.8
            else rng.sample([c + n for n in TAG_NUMBERS], 2)
        )
        return tuple(sorted(tags))

    history = tuple(item() for _ in range(HISTORY_ITEMS))
    return User(interests, liked, history, tuple(item() for _ in range(FUTURE_ITEMS)))


def history_tags(history: str) -> list[str]:
    """The tags of a history's items, in order (`a13 c25` -> a1 a3 c2 c5)."""
    return [item[0] + n for item in history.split() for n in item[1:]]


def _ranked(counts: Counter, order: list[str]) -> list[str]:
    """Keys by count, ties by first appearance in `order`."""
    return sorted(counts, key=lambda k: (-counts[k], order.index(k)))


def teacher_plan(history: str) -> list[str]:
    """The two most frequent categories (a one-category history: the next letter too)."""
    cats = [t[0] for t in history_tags(history)]
    plan = _ranked(Counter(cats), cats)[:2]
    return sorted(plan + [c for c in CATEGORIES if c not in plan][: 2 - len(plan)])


def teacher_expert(history: str, intents: list[str], size: int = 3) -> list[str]:
    """The intents' most frequent tags in the history, topped up with unseen ones."""
    seen = [t for t in history_tags(history) if t[0] in intents]
    tags = _ranked(Counter(seen), seen)[:size]
    for c in intents:
        tags += [c + n for n in TAG_NUMBERS if c + n not in tags][: size - len(tags)]
    return sorted(tags[:size])


def teacher_arbiter(history: str, proposals: list[list[str]], top_n: int) -> list[str]:
    """The proposed tags most backed by the history and the experts together."""
    counts = Counter(history_tags(history))
    pool = [t for tags in proposals for t in tags]
    backing = Counter({t: counts[t] + pool.count(t) for t in pool})
    return sorted(_ranked(backing, pool)[:top_n])


def expert_intents(k: int, intents: list[str]) -> list[str]:
    """Expert k's intents: expert1 and expert2 take one each, the last all."""
    return intents if k == EXPERTS else intents[k - 1 : k]


def expert_prompt(k: int, intents: list[str], history: str) -> str:
    return f"exp{k}:{''.join(expert_intents(k, intents))}:{history}>"


def arbiter_prompt(history: str, proposals: list[list[str]]) -> str:
    return f"arb:{history}{SEPARATOR}{';'.join(''.join(p) for p in proposals)}>"


class Coordinator(TaskEnv):
    """One episode's hand-overs: the planner's intents go to the experts, their tags to the
    arbiter; the arbiter's answer ends it. `info["agent"]` names who answers next; the
    last step's info holds the whole team's output (plan, experts, final) for the reward.
    A malformed plan ends the episode (its reward then fails the length band)."""

    def __init__(self, task: RecGPTTask, meta: dict[str, Any]):
        super().__init__(task, meta)
        self.plan: list[str] = []
        self.experts: list[list[str]] = []

    def step(self, action: str) -> tuple[str, bool, dict[str, Any]]:
        history = self.meta["history"]
        if self.turn == 0:
            self.plan = parse_intents(action) or []
            self.turn = 1
            if len(set(self.plan)) != 2:
                return "", True, self._summary([], error="the plan is not two intents")
            return expert_prompt(1, self.plan, history), False, {"agent": "expert1"}
        if self.turn <= EXPERTS:
            self.experts.append(parse_tags(action) or [])
            self.turn += 1
            if self.turn <= EXPERTS:
                k = self.turn
                return expert_prompt(k, self.plan, history), False, {"agent": f"expert{k}"}
            return arbiter_prompt(history, self.experts), False, {"agent": "arbiter"}
        return "", True, self._summary(parse_tags(action) or [])

    def _summary(self, final: list[str], **extra) -> dict[str, Any]:
        return {"plan": self.plan, "experts": self.experts, "final": final, **extra}


@register_task("recgpt")
class RecGPTTask(Task):
    name = "recgpt"
    multi_turn = True
    default_reward = "recgpt_acc"

    def __init__(self, seed: int = 0, noise: float = 0.15, top_n: int = 4, heldout_size: int = 200):
        if not 0 <= noise < 1:
            raise ValueError("task.params.noise: a share of noise items, in [0, 1)")
        if not 1 <= top_n <= 8:
            raise ValueError("task.params.top_n: the arbiter's final tags, between 1 and 8")
        self.seed, self.noise, self.top_n, self.heldout_size = seed, noise, top_n, heldout_size

    def size(self, split: Split) -> int | None:
        return self.heldout_size if split == "heldout" else None

    def example(self, split: Split, index: int) -> Example:
        user = make_user(random.Random(f"recgpt/{self.seed}/{split}/{index}"), self.noise)
        history = user.history_text
        plan = teacher_plan(history)
        return Example(
            f"recgpt-{split}-{index}",
            f"plan:{history}>",
            "".join(user.target),
            meta={
                "history": history,
                "target": user.target,
                "interests": list(user.interests),
                "top_n": self.top_n,
                "max_turns": len(AGENTS),
            },
            demonstration=(("model", "".join(plan)),),
        )

    def sft_examples(self, example: Example) -> list[Example]:
        """The teacher's turn of every agent, each from its own prompt."""
        history = example.meta["history"]
        plan = teacher_plan(history)
        proposals = [
            teacher_expert(history, expert_intents(k, plan)) for k in range(1, EXPERTS + 1)
        ]
        pairs = [(example.prompt, "".join(plan))]
        pairs += [
            (expert_prompt(k, plan, history), "".join(tags))
            for k, tags in enumerate(proposals, start=1)
        ]
        final = teacher_arbiter(history, proposals, self.top_n)
        pairs.append((arbiter_prompt(history, proposals), "".join(final)))
        return [
            Example(
                f"{example.id}-{agent}", prompt, example.answer, example.meta, (("model", text),)
            )
            for agent, (prompt, text) in zip(AGENTS, pairs, strict=True)
        ]

    def open_env(self, meta: dict[str, Any]) -> Coordinator:
        return Coordinator(self, meta)


class AlignTask(Task):
    """The alignment reward model's data: `align_prompt(history, tag)`, labelled y when the
    tag's category occurs in the history, n when not (half of each)."""

    name = "recgpt_align"

    def __init__(self, seed: int):
        self.seed = seed

    def example(self, split: Split, index: int) -> Example:
        rng = random.Random(f"recgpt-align/{self.seed}/{split}/{index}")
        history = make_user(rng, noise=0.15).history_text
        present = sorted({t[0] for t in history_tags(history)})
        absent = [c for c in CATEGORIES if c not in present]
        label = "y" if rng.random() < 0.5 else "n"
        category = rng.choice(present if label == "y" else absent)
        prompt = align_prompt(history, category + rng.choice(TAG_NUMBERS))
        return Example(f"recgpt-align-{split}-{index}", prompt, label)


SEPARATOR = "="  # between the history and what follows it (the experts' tags, a tag)


def align_prompt(history: str, tag: str) -> str:
    return f"{history}{SEPARATOR}{tag}"


ALIGN_MODEL = {"seed": 0, "hidden": 32, "steps": 300, "batch": 64, "lr": 1e-2}


def train_align_model(folder: str | Path, steps: int | None = None) -> Path:
    """Create and train the alignment reward model into `folder`: a bag-of-tokens
    classifier (rollfleet.models.bag_classifier) on `AlignTask`; seconds on one core."""
    import torch

    from rollfleet.models.bag_classifier import BagClassifierConfig, BagForSequenceClassification
    from rollfleet.models.batching import pad_sequences
    from rollfleet.models.tokenizer import save_char_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = save_char_tokenizer(folder)
    torch.manual_seed(ALIGN_MODEL["seed"])
    model = BagForSequenceClassification(
        BagClassifierConfig(
            vocab_size=len(tokenizer),
            hidden_size=ALIGN_MODEL["hidden"],
            separator_id=tokenizer.convert_tokens_to_ids(SEPARATOR),
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=ALIGN_MODEL["lr"])
    task, batch = AlignTask(ALIGN_MODEL["seed"]), ALIGN_MODEL["batch"]
    for step in range(steps or ALIGN_MODEL["steps"]):
        examples = [task.example("train", step * batch + i) for i in range(batch)]
        ids, attention = pad_sequences(
            [tokenizer.encode(e.prompt, add_special_tokens=False) for e in examples],
            tokenizer.pad_token_id,
        )
        labels = torch.tensor([float(e.answer == "y") for e in examples])
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="train RecGPT-V2's alignment reward model")
    parser.add_argument("command", choices=["align"])
    parser.add_argument("out")
    args = parser.parse_args()
    train_align_model(args.out)
    print(f"alignment reward model saved in {args.out}")
