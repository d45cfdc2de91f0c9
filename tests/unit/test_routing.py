"""Affinity routing's decisions (rollfleet.routing): profiles from the task and from
running statistics, the preferred pool, fallback when it is saturated, and token counts."""

from __future__ import annotations

from rollfleet.protocol import Segment, Trajectory, TrajectoryStatus
from rollfleet.routing import Router, token_profile
from rollfleet.spec import RLJobSpec


def spec(pools, **rollout) -> RLJobSpec:
    return RLJobSpec.model_validate(
        {
            "rollout": {
                "routing": "affinity",
                "pools": pools,
                "sampling": {"groupSize": 4},
                **rollout,
            }
        }
    )


TWO_POOLS = [
    {"name": "fast", "prefers": "prefill", "replicas": 1, "maxBatch": 8},
    {"name": "wide", "prefers": "decode", "replicas": 2, "maxBatch": 16},
]


def trajectory(context: int, generated: int, segments: int = 0) -> Trajectory:
    """`context` prompt tokens, then `generated` model tokens (mask 1) and as many env tokens
    again as `context` (mask 0) in the response; split over `segments` agents if any."""

    def part():
        return dict(
            prompt_ids=[1] * context,
            response_ids=[2] * (generated + context),
            behaviour_logprobs=[0.0] * (generated + context),
            token_versions=[0] * (generated + context),
            loss_mask=[1.0] * generated + [0.0] * context,
        )

    empty = dict(
        prompt_ids=[], response_ids=[], behaviour_logprobs=[], token_versions=[], loss_mask=[]
    )
    return Trajectory(
        task_id="t0",
        group_id="g0",
        sample_index=0,
        group_size=1,
        worker="w",
        status=TrajectoryStatus.COMPLETED,
        **(empty if segments else part()),
        segments=[Segment(agent=f"a{i}", **part()) for i in range(segments)],
    )


def test_token_profile_counts_prefilled_and_generated_tokens():
    assert token_profile(trajectory(10, 3)) == (20, 3)  # prompt 10 + env 10; 3 generated
    assert token_profile(trajectory(10, 3, segments=2)) == (40, 6)  # summed over the agents


def test_profile_starts_from_the_task_and_follows_finished_episodes():
    router = Router(spec(TWO_POOLS))
    assert router.profile("calc", multi_turn=True) == "prefill"
    assert router.profile("count", multi_turn=False) == "decode"
    for _ in range(5):
        router.observe("count", trajectory(context=50, generated=2))  # 100 / 2 > 4
        router.observe("calc", trajectory(context=2, generated=40))
    assert router.profile("count", multi_turn=False) == "prefill"
    assert router.profile("calc", multi_turn=True) == "decode"


def test_each_profile_goes_to_its_pool_until_that_pool_is_saturated():
    router = Router(spec(TWO_POOLS, saturatedBacklog=2.0))
    route = router.route("prefill", {})
    assert (route.pool, route.fallback) == ("fast", False)
    assert router.route("decode", {}).pool == "wide"
    # fast runs 2 tasks and holds 4 waiting: 2x, not yet saturated; 5 waiting is.
    running = {"fast": 2, "wide": 0}
    assert router.route("prefill", {"fast": 4}, running).pool == "fast"
    route = router.route("prefill", {"fast": 5}, running)
    assert (route.pool, route.fallback, route.profile) == ("wide", True, "prefill")
    # A pool runs at least one task per replica: wide (2 replicas) saturates above 4.
    route = router.route("prefill", {"fast": 5, "wide": 5}, running)
    assert (route.pool, route.fallback) == ("fast", False)  # all saturated: stays


def test_what_a_pool_runs_is_what_was_sent_there_and_is_not_back():
    """A KV-bound replica runs fewer tasks than its slots allow: the router measures it."""
    router = Router(spec(TWO_POOLS, saturatedBacklog=1.0))
    for i in range(6):
        router.sent(f"t{i}", "fast", samples=2)
    # 6 in flight, 3 of them still queued: fast runs 3, so 3 waiting is 1x.
    assert router.route("prefill", {"fast": 3}).pool == "fast"
    for _ in range(2):
        router.arrived("t0")  # t0's two samples are back: 2 running
    router.forget("t1")  # cancelled: 1 running
    assert router.in_flight == {"fast": 4, "wide": 0}
    assert router.route("prefill", {"fast": 3}).fallback  # 3 waiting on 1 running
    router.arrived("t9")  # not ours (a resumed run's leftover): ignored
    assert router.in_flight["fast"] == 4


def test_least_loaded_of_the_preferred_pools_and_any_pools_as_the_default():
    pools = [
        {"name": "a", "prefers": "decode", "maxBatch": 8},
        {"name": "b", "prefers": "decode", "maxBatch": 8},
        {"name": "c", "prefers": "any", "maxBatch": 8},
    ]
    router = Router(spec(pools))
    assert router.route("decode", {"a": 3, "b": 1}).pool == "b"
    # No pool prefers prefill: the `any` pool takes it, the decode pools only as fallback.
    assert router.route("prefill", {"a": 0, "b": 0, "c": 1}).pool == "c"
    route = router.route("prefill", {"a": 0, "b": 2, "c": 100})
    assert (route.pool, route.fallback) == ("a", True)
