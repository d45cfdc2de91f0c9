"""RAVR's stages: the posterior prompt for part of each group (build_request), the pull
rows that train the question-only prompt on posterior traces (build_batch), and the
utilities and advantages of a batch (advantages). The math is in utility.py."""

from __future__ import annotations

import dataclasses
import logging

import torch

from rollfleet.methods import Method
from rollfleet.methods.ravr.utility import continuation_logprobs, ravr_advantages
from rollfleet.models.batching import TrainBatch
from rollfleet.protocol import RavrSample, TrajectoryStatus
from rollfleet.tasks import Example, Task

log = logging.getLogger("trainer")


class PosteriorTask(Task):
    """The task's examples under the posterior template, with their own demonstrations."""

    def __init__(self, task: Task, template: str):
        self.task, self.template = task, template
        self.name = f"{task.name}+answer"

    def example(self, split, index: int) -> Example:
        base = self.task.example(split, index)
        prompt = self.template.format(question=base.prompt, answer=base.answer)
        return dataclasses.replace(base, prompt=prompt)


class Ravr(Method):
    name = "ravr"

    # --- rollout side -------------------------------------------------------------------
    def build_request(self, task, request, tokenizer):
        p = self.params
        question = request.prompt_ids
        posterior = request.sample is not None and request.sample < p.posteriorSamples
        prompt = question
        if posterior:
            text = p.template.format(question=tokenizer.decode(question[1:]), answer=task.answer)
            prompt = [question[0], *tokenizer.encode(text, add_special_tokens=False)]
        sample = RavrSample(
            posterior=posterior,
            question_ids=question,
            cue_ids=tokenizer.encode(p.answerCue, add_special_tokens=False),
            reference_ids=tokenizer.encode(task.answer, add_special_tokens=False),
        )
        return dataclasses.replace(
            request,
            prompt_ids=prompt,
            conditioning=request.conditioning.model_copy(update={"ravr": sample}),
        )

    # --- trainer side -------------------------------------------------------------------
    def warmup(self, model, tokenizer, task, folder) -> None:
        from rollfleet.models.warmup import warmup_sft

        steps, warm = self.params.posteriorWarmupSteps, self.spec.model.warmup
        if not steps:
            return
        log.info("RAVR: %d SFT steps on demonstrations under the posterior template", steps)
        warmup_sft(
            model,
            tokenizer,
            PosteriorTask(task, self.params.template),
            steps=steps,
            batch_size=warm.batchSize,
            lr=warm.learningRate,
            seed=self.spec.seed,
            examples=warm.examples,
        )

    def build_batch(self, batch: TrainBatch) -> TrainBatch:
        """Each group's samples, then its posterior traces again under the question-only
        prompt (the pull rows): groups of n + k rows."""
        n = batch.group_size
        rows, posterior, pull = [], [], []
        for g in range(len(batch) // n):
            group = batch.trajectories[g * n : (g + 1) * n]
            seen = [t for t in group if _ravr(t).posterior]
            rows += group + [
                t.model_copy(update={"prompt_ids": _ravr(t).question_ids}) for t in seen
            ]
            posterior += [_ravr(t).posterior for t in group] + [False] * len(seen)
            pull += [False] * n + [True] * len(seen)
        out = TrainBatch.from_trajectories(
            rows, len(rows) // (len(batch) // n), batch.pad_id, batch.input_ids.device
        )
        out.extras = {
            **batch.extras,
            "ravr_posterior": torch.tensor(posterior),
            "ravr_pull": torch.tensor(pull),
            "ravr_samples": n,
        }
        return out

    def advantages(self, model, batch: TrainBatch, rewards, estimate):
        p = self.params
        n, width = batch.extras["ravr_samples"], batch.group_size
        groups = len(batch) // width
        samples = [t for i, t in enumerate(batch.trajectories) if i % width < n]
        utilities = continuation_logprobs(
            model,
            [(_ravr(t).question_ids + _before_answer(t), _ravr(t).reference_ids) for t in samples],
            batch.pad_id,
        ).exp()
        posterior = batch.extras["ravr_posterior"].view(groups, width)[:, :n]
        sample_adv, pull_adv = ravr_advantages(
            rewards.float(), utilities.view(groups, n), posterior, estimate, p.pullWeight
        )
        prior_rewards = rewards[~posterior].view(groups, -1)
        metrics = {
            "ravr_utility_prior": float(utilities.view(groups, n)[~posterior].mean()),
            "ravr_utility_posterior": float(utilities.view(groups, n)[posterior].mean()),
            "ravr_prior_reward": float(prior_rewards.float().mean()),
            "ravr_zero_advantage_groups": float(
                (prior_rewards.max(-1).values == prior_rewards.min(-1).values).float().mean()
            ),
        }
        return torch.cat([sample_adv, pull_adv], dim=1).reshape(-1), metrics


def _ravr(trajectory) -> RavrSample:
    if trajectory.conditioning.ravr is None:
        raise ValueError(
            f"trajectory {trajectory.task_id}/{trajectory.sample_index} carries no RAVR "
            "conditioning: were its workers started without methods.ravr?"
        )
    return trajectory.conditioning.ravr


def _before_answer(trajectory) -> list[int]:
    """The trace z up to where the answer is scored: the response (without its end token)
    up to its last `answerCue`, where it states its answer (`39/3=13,13-4=`), or the
    whole response followed by the cue when it never writes one."""
    ids = trajectory.response_ids
    if trajectory.status == TrajectoryStatus.COMPLETED and ids:
        ids = ids[:-1]
    cue = _ravr(trajectory).cue_ids
    for start in range(len(ids) - len(cue), -1, -1):
        if ids[start : start + len(cue)] == cue:
            return ids[: start + len(cue)]
    return ids + cue
