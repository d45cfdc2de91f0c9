"""Data-parallel training with Ray Train, continued from test_ray_trainer.py (its helpers and
fixtures, a Ray instance of this module's own): checkpoints written by 2 workers resume on
1 and the other way round, and sequence-mean aggregation with RAVR takes the step of one
process. A file of its own so that two test processes share the Ray tests.
"""

# The fixtures are imported (each module gets its own Ray instance): F811 is their use.
# ruff: noqa: F811

from __future__ import annotations

import shutil

from tests.services.test_ray_trainer import (  # noqa: F401 (fixtures)
    ATOL,
    STEPS,
    assert_close,
    fit_two_workers,
    local_ray,
    setting,
    train,
    weights,
)


def test_sequence_mean_aggregation_and_ravr_are_also_exact_across_workers(local_ray, setting):
    """The ranks sum the aggregation's denominator (here: sequences) before dividing, and a
    method that adds rows (RAVR's pull rows) keeps the step of one process."""
    root, config = setting
    seq = {"aggregation": "seq-mean-token-mean", "ravr": True}
    train(config("seq-single", STEPS, "k.safetensors", **seq))
    fit_two_workers(config("seq-two", STEPS, "k.safetensors", **seq), local_ray)
    one, two = (
        weights(root / "seq-single" / "k.safetensors"),
        weights(root / "seq-two" / "k.safetensors"),
    )
    assert_close(two, one)
    token_mean = weights(root / "single" / "k.safetensors")
    assert max((one[k] - token_mean[k]).abs().max().item() for k in one) > 10 * ATOL  # not a no-op


def test_checkpoint_of_two_workers_resumes_on_one(local_ray, setting):
    root, config = setting
    fit_two_workers(config("two-then-one", STEPS, "k.safetensors"), local_ray)
    train(config("two-then-one", STEPS, "final.safetensors", resume=True))
    assert_close(
        weights(root / "two-then-one" / "final.safetensors"),
        weights(root / "straight" / "final.safetensors"),
    )


def test_checkpoint_of_one_worker_resumes_on_two(local_ray, setting):
    root, config = setting
    shutil.copytree(root / "one-worker-checkpoints", root / "one-then-two" / "checkpoints")
    fit_two_workers(config("one-then-two", STEPS, "final.safetensors", resume=True), local_ray)
    assert_close(
        weights(root / "one-then-two" / "final.safetensors"),
        weights(root / "straight" / "final.safetensors"),
    )
