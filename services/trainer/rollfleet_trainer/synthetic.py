"""Seeded synthetic trajectory groups: train steps without rollouts, for checks and benchmarks.

    batch = synthetic_groups(step=0, prompts=8, group_size=8, vocab=64)
    trainer.train_step(batch)

Random prompt and response tokens, behaviour log-probs and 0/1 rewards; response lengths
vary, so data-parallel ranks hold different token counts, as they do in real runs.
"""

from __future__ import annotations

import random

from rollfleet.protocol import Trajectory, TrajectoryStatus
from rollfleet_trainer.loop import Group


def synthetic_groups(
    step: int,
    prompts: int,
    group_size: int,
    vocab: int,
    prompt_len: tuple[int, int] = (3, 8),
    response_len: tuple[int, int] = (2, 14),
) -> list[Group]:
    """The groups of one step (seeded by `step`); group i has index step·prompts + i."""
    rng = random.Random(1000 + step)
    groups = []
    for g in range(prompts):
        group = Group(index=step * prompts + g, size=group_size)
        prompt = [1] + [rng.randrange(4, vocab) for _ in range(rng.randint(*prompt_len))]
        for i in range(group_size):
            n = rng.randint(*response_len)
            trajectory = Trajectory(
                task_id=f"t{group.index}",
                group_id=group.id,
                sample_index=i,
                group_size=group_size,
                worker="synthetic",
                status=TrajectoryStatus.COMPLETED,
                prompt_ids=prompt,
                response_ids=[rng.randrange(4, vocab) for _ in range(n)],
                behaviour_logprobs=[-rng.uniform(0.5, 4.0) for _ in range(n)],
                token_versions=[step] * n,
                loss_mask=[1.0] * n,
                reward=float(rng.random() < 0.5),
            )
            group.samples[i] = (trajectory, None)
        groups.append(group)
    return groups
