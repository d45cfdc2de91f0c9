"""BARD's stages: the budget in the prompt (build_request), the budget in what the reward
sees (reward_input), and phase 1, SFT on chains compressed to each budget (warmup)."""

from __future__ import annotations

import dataclasses
import logging

from rollfleet.methods import Method
from rollfleet.methods.bard import budget_marker
from rollfleet.tasks import Example, Task

log = logging.getLogger("trainer")


def budget_for(task_index: int, budgets: list[int]) -> int:
    """A group's budget: every sample of one prompt shares it (GRPO compares them)."""
    return budgets[task_index % len(budgets)]


class BudgetedTask(Task):
    """The task's train examples, each at every budget: the prompt behind its budget marker
    and the teacher chain compressed to fit (the task's `budgeted_demonstration`)."""

    def __init__(self, task: Task, budgets: list[int], count):
        if not hasattr(task, "budgeted_demonstration"):
            raise ValueError(
                f"methods.bard: task {task.name!r} has no compressed chains "
                "(budgeted_demonstration); use a task that has, e.g. chain_sum"
            )
        self.task, self.budgets, self.count = task, budgets, count
        self.name = f"{task.name}+budgets"

    def example(self, split, index: int) -> Example:
        base = self.task.example(split, index // len(self.budgets))
        budget = budget_for(index, self.budgets)
        text = self.task.budgeted_demonstration(base, budget, self.count)
        return dataclasses.replace(
            base,
            prompt=budget_marker(budget) + base.prompt,
            demonstration=(("model", text),),
            meta={**base.meta, "budget": budget},
        )


class Bard(Method):
    name = "bard"

    def budget(self, task) -> int:
        return int(task.meta.get("budget", budget_for(task.index, self.params.budgets)))

    def build_request(self, task, request, tokenizer):
        budget = self.budget(task)
        bos, *prompt = request.prompt_ids
        marker = tokenizer.encode(budget_marker(budget), add_special_tokens=False)
        return dataclasses.replace(
            request,
            prompt_ids=[bos, *marker, *prompt],
            conditioning=request.conditioning.model_copy(update={"budget": budget}),
        )

    def reward_input(self, task, episode, item):
        return {**item, "meta": {**item["meta"], "budget": self.budget(task)}}

    def warmup(self, model, tokenizer, task, folder) -> None:
        from rollfleet.models.warmup import warmup_sft

        p = self.params
        if not p.sftSteps:
            return

        def tokens(text: str) -> int:  # as the model writes it: with its end token
            return len(tokenizer.encode(text, add_special_tokens=False)) + 1

        budgeted = BudgetedTask(task, p.budgets, tokens)
        # The demonstrations the warm-up learned from, each at every budget.
        shown = self.spec.model.warmup.examples
        log.info("BARD phase 1: %d SFT steps on chains compressed to %s", p.sftSteps, p.budgets)
        warmup_sft(
            model,
            tokenizer,
            budgeted,
            steps=p.sftSteps,
            batch_size=p.sftBatchSize,
            lr=p.sftLearningRate,
            seed=self.spec.seed,
            examples=None if shown is None else shown * len(p.budgets),
        )
