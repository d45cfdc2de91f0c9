"""Reward functions registered by name, and their weighted composition.

Each function maps (response, answer, meta, **params) to a float. A function that also
wants more of the episode declares it as a keyword: `response_tokens` (tokens the model
generated) or `turns` (the transcript, each turn a {role, text, tokens, info} map), and
gets it from the scored item. The reward service serves them over HTTP; the trainer uses
the same functions for held-out evaluation.

    item = {"response": "3*5+7", "answer": "22", "meta": {"numbers": [3, 5, 7], "target": 22}}
    total, parts = compose([("countdown", 1.0, {})], item)

Model-based functions (a reader, a judge) are registered with `batched=True`: they take
the whole batch of items and the reward service's models (`reward.models`, Hugging Face
folders loaded once by name, `RewardModels`), and return one value per item;
`compose_batch` scores a batch with both kinds. They run in the reward service only: the
trainer's held-out verifier (the first function) must be rule-based.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollfleet.tasks import qagent, recgpt
from rollfleet.tasks.chain_sum import final_number
from rollfleet.tasks.countdown import verify
from rollfleet.tasks.recommend import item_codes, verifier_for

REWARDS: dict[str, Callable[..., float]] = {}
BATCHED: set[str] = set()  # model-based functions: (items, models, **params) -> values
# Functions whose value is a degree (a recall), not a pass mark: held-out accuracy is
# their mean rather than the share of answers scoring 1.
GRADED: set[str] = set()

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def register_reward(name: str, batched: bool = False, graded: bool = False):
    def wrap(fn):
        REWARDS[name] = fn
        if batched:
            BATCHED.add(name)
        if graded:
            GRADED.add(name)
        return fn

    return wrap


@register_reward("exact_match")
def exact_match(response: str, answer: str, meta: dict[str, Any], strip: bool = True) -> float:
    """1 if the response equals the answer (whitespace-stripped by default)."""
    if strip:
        response, answer = response.strip(), answer.strip()
    return float(response == answer)


@register_reward("numeric")
def numeric(response: str, answer: str, meta: dict[str, Any], tolerance: float = 1e-6) -> float:
    """1 if the last number in the response equals the answer within `tolerance`."""
    found = _NUMBER.findall(response)
    if not found:
        return 0.0
    try:
        return float(abs(float(found[-1]) - float(answer)) <= tolerance)
    except ValueError:
        return 0.0


@register_reward("countdown")
def countdown(response: str, answer: str, meta: dict[str, Any]) -> float:
    """1 if the expression uses each given number once and reaches the target."""
    return float(verify(response, meta["numbers"], int(meta["target"])))


@register_reward("mixed")
def mixed(response: str, answer: str, meta: dict[str, Any], **episode: Any) -> float:
    """The `mixed` task: each example scored by its own task's verifier (meta.verifier),
    with the episode fields (transcript, token count) that verifier asks for."""
    name = meta.get("verifier")
    if name not in REWARDS or name == "mixed":
        raise ValueError(f"meta.verifier {name!r} is not a reward function")
    wanted = {f: episode[f] for f in _episode_fields(name) if f in episode}
    return REWARDS[name](response, answer, meta, **wanted)


@register_reward("chain_sum")
def chain_sum(response: str, answer: str, meta: dict[str, Any]) -> float:
    """1 if the response is a chain of numbers (`10,19,29`) whose last one is the answer."""
    return float(final_number(response) == answer.strip())


@register_reward("solve")
def solve(response: str, answer: str, meta: dict[str, Any]) -> float:
    """1 if the response's last step ends with the answer (`39/3=13,13-4=9`)."""
    last = response.strip().split(",")[-1]
    return float(last.rpartition("=")[2].strip() == answer.strip())


def budget_fidelity(length: int, budget: int, tolerance: float = 0.1) -> float:
    """How well a response of `length` tokens keeps to `budget`: 1 within ±tolerance·budget,
    then falling linearly to 0 at twice the budget or at none (two-sided: too short is
    as far off the control signal as too long)."""
    off = max(0.0, abs(length - budget) - tolerance * budget)
    return max(0.0, 1.0 - off / budget)


@register_reward("bard")
def bard(
    response: str,
    answer: str,
    meta: dict[str, Any],
    response_tokens: int,
    verifier: str = "chain_sum",
    form: str = "multiplicative",
    tolerance: float = 0.1,
) -> float:
    """BARD's reward (arXiv 2511.01470): accuracy (the `verifier`) times budget fidelity
    (`meta["budget"]`, which the bard method's reward_input adds); `form: additive` is
    their mean, the ablation that lets a short wrong answer earn half."""
    accuracy = REWARDS[verifier](response, answer, meta)
    fidelity = budget_fidelity(response_tokens, int(meta["budget"]), tolerance)
    if form == "multiplicative":
        return accuracy * fidelity
    if form == "additive":
        return 0.5 * (accuracy + fidelity)
    raise ValueError(f"bard reward: form {form!r} must be multiplicative or additive")


@register_reward("recommend")
def recommend(response: str, answer: str, meta: dict[str, Any], later_hit: float = 0.5) -> float:
    """A recommended item (`tkq`): 1 if it is the user's next item, `later_hit` if it is one
    of the items after that (`meta["next"]`), else 0; an item not in the catalogue is never
    a hit, so it earns 0."""
    item = response.strip()
    upcoming = meta.get("next") or [answer]
    if item == upcoming[0]:
        return 1.0
    return later_hit if item in upcoming[1:] else 0.0


@register_reward("item_valid")
def item_valid(response: str, answer: str, meta: dict[str, Any]) -> float:
    """1 if the response is an item of the task's catalogue (NEZHA's verifier; reported,
    usually weighted 0)."""
    codes = item_codes(response)
    return float(codes is not None and verifier_for(**meta["catalogue"]).valid(codes))


@register_reward("format")
def format_reward(
    response: str, answer: str, meta: dict[str, Any], pattern: str = r"^[0-9+\-*()]+$"
) -> float:
    """1 if the whole response matches `pattern` (a shaping term, usually weighted low)."""
    return float(re.fullmatch(pattern, response.strip()) is not None)


BUILTIN_MODELS: dict[str, Callable[..., Any]] = {
    # name -> trainer(folder): the builtin tasks' reward models, created where they are
    # served (`reward.models: {reader: "builtin:qagent-reader"}`), as the builtin policy is.
    **{name: functools.partial(qagent.train_reader, name=name) for name in qagent.READERS},
    "recgpt-align": recgpt.train_align_model,
}
BUILTIN = "builtin:"


def builtin_model_error(source: str) -> str | None:
    """Why a `reward.models` entry naming a builtin model is wrong, or None."""
    if source.startswith(BUILTIN) and source[len(BUILTIN) :] not in BUILTIN_MODELS:
        return f"{source!r} is no builtin model; choose one of {sorted(BUILTIN_MODELS)}"
    return None


class RewardModels:
    """The reward service's models by name (`reward.models`: name -> Hugging Face folder,
    or `builtin:<name>`, a model of `BUILTIN_MODELS` trained into `cache` on first start),
    each loaded once, frozen, with its tokenizer. A causal LM (a reader, a judge) answers:
    `answer(name, prompts)` decodes greedily in one batch, up to end-of-sequence. A
    sequence classifier (a reward model) scores: `probability(name, texts)`.

    Folders load before the constructor returns (a bad one is an error naming its entry).
    A builtin model not yet in the cache is trained in a background thread, so the service
    answers /healthz meanwhile; `answer` waits for it (`ready` says whether it is done)."""

    def __init__(self, folders: dict[str, str], cache: str | Path = "reward-models"):
        import threading

        self.loaded = {}
        self._lock = threading.Lock()  # the service scores requests in several threads
        self._built = threading.Event()
        self._build_error: str | None = None
        to_build = {}
        for name, source in folders.items():
            if (error := builtin_model_error(source)) is not None:
                raise ValueError(f"reward.models.{name}: {error}")
            if source.startswith(BUILTIN):
                folder = Path(cache) / source[len(BUILTIN) :]
                if not (folder / "config.json").is_file():
                    to_build[name] = (source[len(BUILTIN) :], folder)
                    continue
                source = str(folder)
            self.loaded[name] = self._load(name, source)
        self.names = sorted(folders)
        if to_build:
            threading.Thread(target=self._build, args=(to_build,), daemon=True).start()
        else:
            self._built.set()

    @property
    def ready(self) -> bool:
        return self._built.is_set() and self._build_error is None

    @staticmethod
    def _load(name: str, folder: str | Path):
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        from rollfleet.models.architectures import import_architectures

        import_architectures()
        import rollfleet.models.bag_classifier  # noqa: F401  (registers the builtin scorer)

        try:
            config = AutoConfig.from_pretrained(folder)
            classifier = any(
                a.endswith("ForSequenceClassification") for a in config.architectures or ()
            )
            auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
            model = auto.from_pretrained(folder).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except OSError as e:
            raise ValueError(
                f"reward.models.{name}: cannot load a Hugging Face model folder from "
                f"{str(folder)!r} ({e})"
            ) from None
        if torch.cuda.is_available():  # reward.gpus: the models share the first GPU
            model = model.to("cuda")
        return model, tokenizer, classifier

    def _build(self, to_build: dict[str, tuple[str, Path]]) -> None:
        """Train each builtin model into a scratch folder renamed when done (a crash leaves
        no half model in the cache), then load it."""
        import logging
        import shutil
        import tempfile

        try:
            for name, (builtin, folder) in to_build.items():
                logging.getLogger("reward").info(
                    "training builtin model %s into %s", builtin, folder
                )
                folder.parent.mkdir(parents=True, exist_ok=True)
                scratch = Path(tempfile.mkdtemp(prefix=f".{builtin}-", dir=folder.parent))
                BUILTIN_MODELS[builtin](scratch)
                shutil.rmtree(folder, ignore_errors=True)
                scratch.rename(folder)
                self.loaded[name] = self._load(name, folder)
        except Exception as e:  # every model-based score then fails with this reason
            self._build_error = f"building reward.models.{name} failed: {type(e).__name__}: {e}"
            logging.getLogger("reward").exception(self._build_error)
        finally:
            self._built.set()

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _model(self, name: str, classifier: bool):
        self._built.wait()
        if self._build_error is not None:
            raise RuntimeError(self._build_error)
        model, tokenizer, is_classifier = self.loaded[name]
        if is_classifier != classifier:
            kind = "a sequence classifier" if is_classifier else "a causal language model"
            raise ValueError(
                f"reward.models.{name} is {kind}; this function needs "
                f"{'a sequence classifier' if classifier else 'a causal language model'}"
            )
        return model, tokenizer

    def answer(self, name: str, prompts: list[str], max_new_tokens: int) -> list[str]:
        from rollfleet.evaluation import _generate

        model, tok = self._model(name, classifier=False)
        ids = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in prompts]
        with self._lock:
            out = _generate(model, tok, ids, max_new_tokens, [tok.eos_token_id], 0.0)
        return [tok.decode([t for t in row if t != tok.eos_token_id]) for row in out]

    def probability(self, name: str, texts: list[str]) -> list[float]:
        """A sequence classifier's probability of its positive label for each text (the
        sigmoid of a single logit, or the softmax's last label), in one batch."""
        import torch

        from rollfleet.models.batching import pad_sequences

        model, tok = self._model(name, classifier=True)
        if not texts:
            return []
        ids, attention = pad_sequences(
            [tok.encode(t, add_special_tokens=False) for t in texts], tok.pad_token_id
        )
        with self._lock, torch.no_grad():
            logits = model(
                input_ids=ids.to(model.device), attention_mask=attention.to(model.device)
            ).logits.float()
        p = torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else logits.softmax(-1)[:, -1]
        return p.tolist()


@register_reward("model_exact_match", batched=True)
def model_exact_match(
    items: list[dict[str, Any]],
    models: RewardModels,
    model: str,
    template: str,
    max_new_tokens: int = 16,
) -> list[float]:
    """A frozen model answers each item from a prompt made by `template` (formatted with
    the item's `response` and its meta's fields, e.g. `{response}|{question}>`: QAgent's
    reader answering from what the agent retrieved); 1 where its answer equals the item's
    reference answer."""
    prompts = [template.format(response=i["response"], **i.get("meta", {})) for i in items]
    answers = models.answer(model, prompts, max_new_tokens)
    return [float(a.strip() == i["answer"].strip()) for a, i in zip(answers, items, strict=True)]


def _qagent_format(turns, meta) -> bool:
    return qagent.follows_protocol(turns, max_rounds=int(meta.get("max_turns", 6)) - 1)


@register_reward("qagent_answer")
def qagent_answer(response: str, answer: str, meta: dict[str, Any]) -> float:
    """QAgent: 1 if the agent's own `<a>answer</a>` equals the reference answer."""
    return float(qagent.parse_answer(response) == answer.strip())


@register_reward("qagent_format")
def qagent_format(
    response: str, answer: str, meta: dict[str, Any], turns: list[dict[str, Any]]
) -> float:
    """QAgent: 1 if the episode follows the protocol (`tasks.qagent.follows_protocol`)."""
    return float(_qagent_format(turns, meta))


@register_reward("qagent_stage1")
def qagent_stage1(
    response: str, answer: str, meta: dict[str, Any], turns: list[dict[str, Any]]
) -> float:
    """QAgent's Stage-1 reward: exact match of the agent's answer times the format flag."""
    return qagent_answer(response, answer, meta) * float(_qagent_format(turns, meta))


@register_reward("qagent_hit")
def qagent_hit(
    response: str, answer: str, meta: dict[str, Any], turns: list[dict[str, Any]]
) -> float:
    """QAgent: 1 if the gold answer appears in a passage the agent retrieved."""
    return float(any(answer.strip() in p for p in qagent.retrieved(turns)))


@register_reward("qagent_reader", batched=True)
def qagent_reader(
    items: list[dict[str, Any]],
    models: RewardModels,
    model: str,
    gold_bonus: float = 0.5,
    passages: int = 6,
    max_new_tokens: int = 8,
) -> list[float]:
    """QAgent's Stage-2 reward: a frozen reader (`model`) answers each question from the
    passages the agent retrieved (`tasks.qagent.reader_prompt`), 1 for its exact match,
    plus `gold_bonus` if the gold answer appears in them. The agent's own answer does
    not count: what is rewarded is retrieval that serves any reader."""
    found = [qagent.retrieved(i["turns"]) for i in items]
    prompts = [
        qagent.reader_prompt(i["meta"]["question"], p, passages)
        for i, p in zip(items, found, strict=True)
    ]
    answers = models.answer(model, prompts, max_new_tokens)
    return [
        float(a.strip() == i["answer"].strip())
        + gold_bonus * any(i["answer"].strip() in text for text in p)
        for a, i, p in zip(answers, items, found, strict=True)
    ]


def models_needed(name: str, params: dict[str, Any]) -> list[str | None]:
    """The `reward.models` names function `name` scores with: its `model` parameter (None
    where a model-based function is not given one), and for `gated` those of the
    functions it composes."""
    if name == "gated":
        own = params.get("params") or {}
        return [
            model
            for sub in (params.get("main"), *(params.get("gates") or {}))
            if sub in REWARDS
            for model in models_needed(sub, own.get(sub, {}))
        ]
    if "model" in inspect.signature(REWARDS[name]).parameters:
        return [params.get("model")]
    return []


EPISODE_FIELDS = ("response_tokens", "turns")  # what a function may ask of the episode


@functools.cache
def _episode_fields(name: str) -> tuple[str, ...]:
    """The episode fields reward function `name` takes (all of them for `**kwargs`)."""
    wanted = inspect.signature(REWARDS[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in wanted.values()):
        return EPISODE_FIELDS
    return tuple(f for f in EPISODE_FIELDS if f in wanted)


def reward_item(task, episode) -> dict[str, Any]:
    """What the reward service scores for one episode by default: the last model turn's
    text, the reference answer and the task's meta, the model's token count and the
    transcript. (`task` is a RolloutTask, `episode` a rollfleet.episodes.Episode.)"""
    return {
        "response": episode.final_text,
        "answer": task.answer,
        "meta": task.meta,
        "response_tokens": episode.response_tokens,
        "turns": [
            {"role": t.role, "text": t.text, "tokens": t.tokens, "info": t.info}
            for t in episode.turns
        ],
    }


def score(name: str, item: dict[str, Any], params: dict[str, Any] | None = None) -> float:
    """One rule-based reward function on one item (a reward_item-shaped dict)."""
    if name in BATCHED:
        raise ValueError(
            f"reward function {name!r} is model-based: it scores batches in the reward "
            "service; list a rule-based function first (the held-out verifier)"
        )
    extra = {f: item[f] for f in _episode_fields(name) if item.get(f) is not None}
    return REWARDS[name](
        item["response"], item["answer"], item.get("meta", {}), **(params or {}), **extra
    )


def _part_names(functions) -> list[str]:
    """Each function's name in the parts; one listed twice (with other params) is
    reported as `name`, `name#2`, ..."""
    names: list[str] = []
    for name, _, _ in functions:
        key, n = name, 1
        while key in names:
            n += 1
            key = f"{name}#{n}"
        names.append(key)
    return names


def compose(
    functions: list[tuple[str, float, dict[str, Any]]], item: dict[str, Any]
) -> tuple[float, dict[str, float]]:
    """Weighted sum of rule-based reward functions on one item; returns (total, {name:
    unweighted value})."""
    parts = {
        key: score(name, item, params)
        for key, (name, _, params) in zip(_part_names(functions), functions, strict=True)
    }
    total = sum(w * parts[k] for k, (_, w, _) in zip(parts, functions, strict=True))
    return total, parts


def _values(
    name: str, params: dict[str, Any], items: list[dict[str, Any]], models: RewardModels | None
) -> tuple[list[float | None], list[str | None]]:
    """One function over a batch: (value or None, error or None) per item. A batched
    function failing fails its whole batch; a rule-based one fails only its item."""
    if name in BATCHED:
        try:
            return list(REWARDS[name](items, models, **params)), [None] * len(items)
        except Exception as e:  # reported per item, counted by the service
            return [None] * len(items), [f"{name}: {type(e).__name__}: {e}"] * len(items)
    values: list[float | None] = []
    errors: list[str | None] = []
    for item in items:
        try:
            values.append(score(name, item, params))
            errors.append(None)
        except Exception as e:  # a bad item must not fail its batch
            values.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    return values, errors


def compose_batch(
    functions: list[tuple[str, float, dict[str, Any]]],
    items: list[dict[str, Any]],
    models: RewardModels | None = None,
) -> list[tuple[float, dict[str, float], str | None]]:
    """`compose` over a batch, model-based functions included: (total, parts, error) per
    item. An item a function fails on scores 0 with the error (a batched function failing
    fails its whole batch); the other items keep their scores."""
    values: dict[str, list[float | None]] = {}
    errors: list[str | None] = [None] * len(items)
    for key, (name, _, params) in zip(_part_names(functions), functions, strict=True):
        values[key], failed = _values(name, params, items, models)
        errors = [old or new for old, new in zip(errors, failed, strict=True)]
    results = []
    for i in range(len(items)):
        if errors[i] is not None:
            results.append((0.0, {}, errors[i]))
            continue
        parts = {key: values[key][i] for key in values}
        total = sum(w * parts[k] for k, (_, w, _) in zip(parts, functions, strict=True))
        results.append((total, parts, None))
    return results


@register_reward("gated", batched=True)
def gated(
    items: list[dict[str, Any]],
    models: RewardModels | None,
    main: str,
    gates: dict[str, float],
    params: dict[str, dict[str, Any]] | None = None,
) -> list[float]:
    """Constrained composition (RecGPT-V2): the `main` reward where every gate function
    reaches its threshold, else 0: R = main x prod 1[gate >= threshold]. `params` holds
    each named function's own parameters. Beside the weighted sum, which lets one term
    pay for another, a gate cannot be traded against accuracy."""
    params = params or {}
    unknown = [n for n in (main, *gates) if n not in REWARDS]
    if unknown:
        raise ValueError(
            f"gated: unknown reward functions {unknown}; registered: {sorted(REWARDS)}"
        )
    totals, errors = _values(main, params.get(main, {}), items, models)
    for name, threshold in gates.items():
        values, failed = _values(name, params.get(name, {}), items, models)
        errors = [old or new for old, new in zip(errors, failed, strict=True)]
        totals = [
            None if t is None or v is None else t * float(v >= threshold)
            for t, v in zip(totals, values, strict=True)
        ]
    if any(e is not None for e in errors):
        raise ValueError(next(e for e in errors if e is not None))
    return totals


# --- RecGPT-V2: the team's output is the last env turn's info (tasks.recgpt.Coordinator) -


def _recgpt_team(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """The plan, the experts' tags and the final tags of an episode (empty when it ended
    before the coordinator summed it up: a truncated turn)."""
    for turn in reversed(turns):
        if turn["role"] == "env" and "final" in turn.get("info", {}):
            return turn["info"]
    return {"plan": [], "experts": [], "final": []}


@register_reward("recgpt_acc", graded=True)
def recgpt_acc(
    response: str, answer: str, meta: dict[str, Any], turns: list[dict[str, Any]]
) -> float:
    """RecGPT-V2's accuracy: recall of the target tags by the arbiter's final top N."""
    final = _recgpt_team(turns)["final"][: int(meta["top_n"])]
    return recgpt.recall(final, meta["target"])


@register_reward("recgpt_diversity")
def recgpt_diversity(
    response: str, answer: str, meta: dict[str, Any], turns: list[dict[str, Any]]
) -> float:
    """RecGPT-V2's diversity: mean pairwise distance of all the experts' tags together
    (tasks.recgpt.tag_distance: 0 the same tag, 0.5 the same category, 1 otherwise)."""
    return recgpt.diversity([t for tags in _recgpt_team(turns)["experts"] for t in tags])


@register_reward("recgpt_length")
def recgpt_length(
    response: str,
    answer: str,
    meta: dict[str, Any],
    turns: list[dict[str, Any]],
    min_tags: int = 2,
    max_tags: int = 4,
) -> float:
    """RecGPT-V2's length band: 1 if the plan is two intents, each expert gives between
    `min_tags` and `max_tags` distinct tags and the arbiter exactly top N of theirs (it
    selects, it does not invent), else 0."""
    team = _recgpt_team(turns)
    experts, final = team["experts"], team["final"]
    proposed = {t for tags in experts for t in tags}
    return float(
        len(set(team["plan"])) == 2
        and len(experts) == recgpt.EXPERTS
        and all(min_tags <= len(set(tags)) == len(tags) <= max_tags for tags in experts)
        and len(set(final)) == len(final) == int(meta["top_n"])
        and set(final) <= proposed
    )


def _recgpt_tags(item: dict[str, Any]) -> list[str]:
    team = _recgpt_team(item["turns"])
    return [t for tags in team["experts"] for t in tags] + team["final"]


@register_reward("recgpt_align", batched=True)
def recgpt_align(items: list[dict[str, Any]], models: RewardModels, model: str) -> list[float]:
    """RecGPT-V2's alignment: the reward model's (`model`, a sequence classifier) mean
    probability that each tag the experts and the arbiter gave fits the user's history
    (tasks.recgpt.align_prompt); 0 for an episode without tags."""
    tags = [_recgpt_tags(i) for i in items]
    texts = [
        recgpt.align_prompt(i["meta"]["history"], t)
        for i, ts in zip(items, tags, strict=True)
        for t in ts
    ]
    scores = iter(models.probability(model, texts))
    return [sum(next(scores) for _ in ts) / len(ts) if ts else 0.0 for ts in tags]


GRADES = {"S": 1.0, "A": 0.5, "B": 0.0}


def senior_review(relevant: bool, well_formed: bool, diverse: bool, covering: bool) -> str:
    """Agent-as-a-Judge's senior reviewer over the sub-evaluators' verdicts: B when a
    critical dimension fails (relevance, format), S when every dimension passes, else A."""
    if not (relevant and well_formed):
        return "B"
    return "S" if diverse and covering else "A"


@register_reward("recgpt_judge", batched=True)
def recgpt_judge(
    items: list[dict[str, Any]],
    models: RewardModels,
    model: str,
    align: float = 0.75,
    diversity: float = 0.5,
) -> list[float]:
    """RecGPT-V2's Agent-as-a-Judge: per-dimension sub-evaluators (relevance: the
    alignment reward model >= `align`; format: the length band; diversity >= `diversity`;
    coverage: the final tags cover both planned intents) and a senior reviewer's grade
    (`senior_review`), S/A/B as 1/0.5/0. It sees no future items: a judge grades as
    production would. Listwise use (S > A > B ranks in a group): methods.recgpt.judge."""
    relevance = recgpt_align(items, models, model)
    grades = []
    for item, relevant in zip(items, relevance, strict=True):
        turns, meta = item["turns"], item["meta"]
        team = _recgpt_team(turns)
        grade = senior_review(
            relevant=relevant >= align,
            well_formed=bool(recgpt_length("", "", meta, turns)),
            diverse=recgpt_diversity("", "", meta, turns) >= diversity,
            covering=bool(team["plan"]) and set(team["plan"]) <= {t[0] for t in team["final"]},
        )
        grades.append(GRADES[grade])
    return grades
