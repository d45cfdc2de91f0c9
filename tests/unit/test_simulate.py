"""The cluster simulator (rollfleet.simulate): its event logic on cases with closed-form
answers, its cluster-file errors, and `rollfleet simulate` end to end on a tiny file."""

from __future__ import annotations

import re

import pytest
import yaml

from rollfleet.cli import main as cli
from rollfleet.simulate import costs
from rollfleet.simulate.config import ClusterError, deep_merge, parse_cluster
from rollfleet.simulate.sim import Device, Sim, Task, simulate


def tiny(**overrides) -> dict:
    """One memory-bound replica of a 1 B-parameter model, one trainer device; no
    overheads, so every time in a run is a cost the tests can add up by hand."""
    base = {
        "classes": {
            "G": {"count": 8, "flops": 1e15, "bandwidth": 1e12, "memoryGB": 80},
            "T": {"count": 8, "flops": 1e14, "bandwidth": 1e12, "memoryGB": 80},
        },
        "network": {"weightSyncGBps": 1, "publishS": 0.5, "swapS": 0.0},
        "efficiency": {
            "prefillMfu": 1.0,
            "decodeMfu": 1.0,
            "trainMfu": 1.0,
            "bandwidthUtil": 1.0,
            "memoryUtil": 1.0,
            "stepOverheadS": 0.001,
        },
        "model": {"params": 1e9, "layers": 16, "hidden": 2048, "heads": 16, "kvHeads": 4},
        "workload": {
            "tasks": [
                {
                    "name": "t",
                    "promptTokens": 1,
                    "responseTokens": {"dist": "uniform", "low": 5, "high": 400},
                }
            ]
        },
        "placement": {"trainerClass": "T"},
        "simulate": {"steps": 3, "seed": 7},
        "spec": {
            "model": {"maxLength": 1024},  # the context: above maxNewTokens
            "async": {"ratio": 0},
            "rollout": {
                "pools": [{"name": "p", "replicas": 1, "gpuClass": "G", "maxBatch": 64}],
                "sampling": {"groupSize": 4, "maxNewTokens": 512},
            },
            "trainer": {"promptsPerStep": 2, "gpusPerWorker": 1},
        },
    }
    return deep_merge(base, overrides)


def cluster(data: dict, variant: str = "main"):
    return parse_cluster(data, "tiny.yaml", variant)


def brute_decode(rc, lengths: list[int], context: list[float]) -> float:
    """Token by token: every step costs step_time for the sequences still running."""
    t, lengths, context = 0.0, list(lengths), list(context)
    for step in range(max(lengths)):
        running = [i for i, n in enumerate(lengths) if n > step]
        t += costs.step_time(rc, len(running), sum(context[i] for i in running))
        for i in running:
            context[i] += 1
    return t


# --- costs ---------------------------------------------------------------------------
@pytest.mark.parametrize("kv", [0.0, 1e-7])
@pytest.mark.parametrize("compute", [1e-5, 1e-3])
def test_decode_time_is_the_sum_of_its_steps_and_inverts(kv, compute):
    rc = costs.ReplicaCosts(1, 0.002, compute, 0.01, 0.001, kv, 0, 0, 1e9, 0, 0)
    for batch, context, steps in ((1, 0, 50), (16, 3000, 200), (128, 1e5, 37)):
        exact = sum(costs.step_time(rc, batch, context + batch * k) for k in range(steps))
        got = costs.decode_time(rc, batch, context, steps)
        # Exact when one term binds throughout; a step's rounding where they cross.
        assert got == pytest.approx(exact, rel=2e-3)
        for seconds in (0.0, got / 3, got):
            steps_in = costs.decode_steps_in(rc, batch, context, seconds)
            assert costs.decode_time(rc, batch, context, steps_in) == pytest.approx(seconds)


def test_kv_capacity_and_prefill_follow_the_spec_sheet():
    c = cluster(tiny())
    rc = costs.replica_costs(c, c.spec.rollout.pools[0])
    per_token = 2 * 16 * 4 * (2048 // 16) * 2  # K and V, layers, kv heads, head dim, BF16
    assert costs.kv_bytes_per_token(c.model) == per_token
    assert rc.kv_capacity_tokens == pytest.approx((80e9 - 2e9) / per_token)
    assert costs.prefill_time(rc, 1000, 0) > 1000 * 2 * 1e9 / 1e15  # plus attention
    assert costs.train_time(c, 1000) == pytest.approx(6 * 1e9 * 1000 / 1e14)


# --- the event loop --------------------------------------------------------------------
@pytest.mark.parametrize("decode_mfu", [1.0, 1e-4])  # memory-bound, KV read growing; compute-bound
def test_synchronous_step_is_the_slowest_sample_plus_training(decode_mfu):
    """α = 0, one replica: a step lasts the prompt's prefill, the batch's decode (every
    sequence at the rate of the batch it shares, until the slowest ends), the training
    step and the publish; then the next step's batch starts."""
    c = cluster(tiny(efficiency={"decodeMfu": decode_mfu}))
    sim = Sim(c, trace=True)
    result = sim.run()
    rc = costs.replica_costs(c, c.spec.rollout.pools[0])
    starts = [0.0, *sim.step_ends[:-1]]
    for step, start, end in zip(sim.trace, starts, sim.step_ends, strict=True):
        lengths = [turns[0] for turns in step["lengths"]]
        assert len(set(lengths)) > 2  # the uniform draw gave a real spread
        prefill = 2 * costs.prefill_time(rc, 1, 0)  # one per group: its samples share it
        decode = brute_decode(rc, lengths, [1.0] * len(lengths))
        tokens = sum(1 + n for n in lengths)
        expected = prefill + decode + costs.train_time(c, tokens) + 0.5
        assert end - start == pytest.approx(expected, rel=1e-6)
    assert result.max_staleness == 0


def test_alpha_zero_never_trains_a_stale_sample_and_alpha_bounds_staleness():
    data = tiny(simulate={"steps": 12}, spec={"trainer": {"promptsPerStep": 4}})
    for alpha in (0, 1, 2):
        result = simulate(cluster(deep_merge(data, {"spec": {"async": {"ratio": alpha}}})))
        assert result.max_staleness <= alpha
        if alpha:  # asynchrony did overlap: some batches were trained off-policy
            assert result.mean_staleness > 0
    sim = Sim(cluster(data), trace=True)
    sim.run()
    for step in sim.trace:
        assert all(v == step["step"] for v in step["versions"])  # sampled by the trained version


def test_kv_capacity_bounds_the_batch_and_maxbatch_the_slots():
    # Each sample holds 1 + 100 tokens; the cache holds 3.5 samples' worth.
    per_token = 2 * 16 * 4 * 128 * 2
    memory = (2e9 + 3.5 * 101 * per_token) / 1e9
    data = tiny(
        classes={"G": {"memoryGB": memory}},
        workload={"tasks": [{"name": "t", "promptTokens": 1, "responseTokens": 100}]},
        spec={"async": {"replicatePrompts": True}},
    )
    assert simulate(cluster(data)).pools["p"]["peak_batch"] == 3
    capped = deep_merge(data, {"spec": {"rollout": {"pools": [{"name": "p", "maxBatch": 2}]}}})
    capped["spec"]["rollout"]["pools"] = [
        {"name": "p", "replicas": 1, "gpuClass": "G", "maxBatch": 2}
    ]
    assert simulate(cluster(capped)).pools["p"]["peak_batch"] == 2


def test_asynchrony_hides_training_and_colocated_sync_holds_the_replicas():
    data = tiny(simulate={"steps": 10})
    sync = simulate(cluster(data))
    async_ = simulate(cluster(deep_merge(data, {"spec": {"async": {"ratio": 2}}})))
    assert async_.samples_per_s > sync.samples_per_s
    assert async_.trainer_idle < sync.trainer_idle
    colocated = simulate(cluster(deep_merge(data, {"placement": {"mode": "colocated"}})))
    # Training on the rollout devices: they are busy while training, the trainer's are unused.
    assert "T" not in colocated.utilisation
    assert colocated.utilisation["G"][0] > sync.utilisation["G"][0]


def test_redundant_rollouts_cancel_stragglers_and_replication_frees_slots():
    tail = {"dist": "lognormal", "median": 40, "sigma": 1.2}
    data = tiny(
        workload={"tasks": [{"name": "t", "promptTokens": 1, "responseTokens": tail}]},
        spec={"async": {"ratio": 1}},
        simulate={"steps": 12},
    )
    data["spec"]["rollout"]["pools"][0]["maxBatch"] = 8  # two groups at a time
    plain = simulate(cluster(data))
    redundant = simulate(cluster(deep_merge(data, {"spec": {"async": {"redundantGroups": 2}}})))
    assert plain.dropped["cancelled"] == 0 < redundant.dropped["cancelled"]
    assert redundant.max_staleness <= 1
    replicated = simulate(
        cluster(deep_merge(data, {"spec": {"async": {"replicatePrompts": True}}}))
    )
    # A group's slots no longer wait for its slowest sample.
    assert replicated.samples_per_s > plain.samples_per_s


def two_pools(saturated: float) -> dict:
    data = tiny(
        workload={
            "tasks": [
                {
                    "name": "agent",
                    "promptTokens": 2000,
                    "turns": 3,
                    "responseTokens": 50,
                    "obsTokens": 500,
                    "envLatencyS": 0.1,
                },
                {"name": "reason", "promptTokens": 10, "responseTokens": 300},
            ]
        },
        spec={
            "async": {"ratio": 1},
            "rollout": {"routing": "affinity", "saturatedBacklog": saturated},
        },
    )
    data["spec"]["rollout"]["pools"] = [
        {"name": "compute", "replicas": 1, "gpuClass": "G", "maxBatch": 4, "prefers": "prefill"},
        {"name": "bandwidth", "replicas": 1, "gpuClass": "G", "maxBatch": 4, "prefers": "decode"},
    ]
    return data


def test_affinity_routes_each_profile_to_its_pool_until_the_backlog_threshold():
    sim = Sim(cluster(two_pools(saturated=1e9)))
    assert sim.profiles == ["prefill", "decode"]
    result = sim.run()
    assert result.pools["compute"]["routed"].keys() == {"prefill"}
    assert result.pools["bandwidth"]["routed"].keys() == {"decode"}
    assert result.pools["compute"]["fallback"] == result.pools["bandwidth"]["fallback"] == 0

    sim = Sim(cluster(two_pools(saturated=2.0)))
    compute, bandwidth = sim.pools
    for pool in sim.pools:  # nobody pulls: the queues only grow
        pool.queue.hungry.clear()
    kinds = []
    for _ in range(5):
        task = Task(None, 0, [], 0)  # a prefill-heavy task (kind 0)
        sim.route(task)
        kinds.append(task.queue is compute.queue)
        assert len(compute.queue.tasks) <= 3
    # The runtime's router: compute runs nothing yet (one task per replica counted), so it
    # is saturated with more than 2 waiting; the rest fall back.
    assert kinds == [True, True, True, False, False]
    assert bandwidth.fallback == 2 and len(bandwidth.queue.tasks) == 2


def test_env_lockstep_waits_for_the_slowest_session():
    data = tiny(
        workload={
            "tasks": [
                {
                    "name": "a",
                    "promptTokens": 1,
                    "turns": 3,
                    "responseTokens": 5,
                    "envLatencyS": {"dist": "lognormal", "median": 1.0, "sigma": 1.5},
                }
            ]
        },
        simulate={"steps": 6},
    )
    free = simulate(cluster(data))
    lockstep = simulate(cluster(deep_merge(data, {"spec": {"async": {"envAsync": False}}})))
    assert lockstep.step_s > free.step_s


def test_shared_cores_split_among_active_processes():
    device = Device(2)

    class User:
        speed = 1.0

        def advance(self, now):
            pass

        def schedule(self):
            pass

    device.users = [User(), User(), User()]
    for active, speed in ((1, 1.0), (2, 1.0), (3, 2 / 3)):
        device.active = active
        device.rebalance(0.0)
        assert all(u.speed == pytest.approx(speed) for u in device.users)


def test_serverless_reward_is_busier_than_a_fixed_fleet():
    data = tiny(
        workload={
            "tasks": [{"name": "t", "promptTokens": 1, "responseTokens": 50, "rewardS": 2.0}]
        },
        spec={"reward": {"replicas": 8, "maxScale": 8, "targetConcurrency": 1}},
        simulate={"steps": 6},
    )
    fixed = simulate(cluster(data))
    serverless = simulate(
        cluster(deep_merge(data, {"reward": {"mode": "serverless", "coldStartS": 0.5}}))
    )
    assert 0 < fixed.reward_utilisation < serverless.reward_utilisation <= 1


# --- errors --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"classes": {"G": {"flop": 1}}}, "classes.G.flop"),
        ({"network": {"weightSyncGBps": None}}, "network.weightSyncGBps"),
        ({"efficiency": {"decodeMfu": 0}}, "efficiency.decodeMfu"),
        (
            {
                "workload": {
                    "tasks": [
                        {"name": "t", "promptTokens": 1, "responseTokens": {"dist": "lognormal"}}
                    ]
                }
            },
            "workload.tasks.0.responseTokens",
        ),
        (
            {"spec": {"rollout": {"pools": [{"name": "p", "maxBatch": 0}]}}},
            "spec.rollout.pools.0.maxBatch",
        ),
        (
            {"spec": {"rollout": {"pools": [{"name": "p", "gpuClass": "H999"}]}}},
            "spec.rollout.pools[0].gpuClass",
        ),
        ({"classes": {"G": {"count": 0}}}, "classes.G.count"),
        (
            {"spec": {"rollout": {"pools": [{"name": "p", "replicas": 9, "gpuClass": "G"}]}}},
            "classes.G.count",
        ),
        ({"placement": {"mode": "colocated"}, "spec": {"async": {"ratio": 2}}}, "spec.async.ratio"),
        ({"placement": {"pools": {"nope": {"gpusPerReplica": 2}}}}, "placement.pools.nope"),
        ({"classes": {"G": {"memoryGB": 1}}}, "placement.pools.p.gpusPerReplica"),
        (
            {
                "claims": [
                    {"key": "k", "what": "w", "variant": "zz", "baseline": "main", "paper": [1.0]}
                ]
            },
            "claims[0].variant",
        ),
    ],
)
def test_bad_cluster_files_name_the_field(overrides, field):
    data = tiny()
    for key, value in overrides.items():
        if key == "spec" and "rollout" in value:
            data["spec"]["rollout"]["pools"] = [
                {"replicas": 1, "gpuClass": "G", **value["rollout"]["pools"][0]}
            ]
            value = {k: v for k, v in value.items() if k != "rollout"}
        data = deep_merge(data, {key: value})
    with pytest.raises(ClusterError) as error:
        cluster(data)
    assert field in str(error.value)


def test_the_job_can_come_from_a_manifest(tmp_path):
    data = tiny()
    manifest = {"apiVersion": "rollfleet.io/v1alpha1", "kind": "RLJob"}
    manifest |= {"metadata": {"name": "m"}, "spec": data.pop("spec")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(manifest))
    from_manifest = parse_cluster({**data, "manifest": "job.yaml"}, tmp_path / "c.yaml")
    assert from_manifest.spec == cluster(tiny()).spec
    with pytest.raises(ClusterError, match="exactly one of spec"):
        parse_cluster(data, tmp_path / "c.yaml")


# --- the command -------------------------------------------------------------------------
def test_simulate_command_end_to_end(tmp_path, capsys):
    data = tiny(
        simulate={"steps": 4},
        variants={
            "sync": {"spec": {"async": {"ratio": 0}}},
            "async": {"spec": {"async": {"ratio": 2}}},
        },
        claims=[
            {
                "key": "rollflash.rlvr",
                "what": "async over sync",
                "variant": "async",
                "baseline": "sync",
                "paper": [2.24],
            }
        ],
        sweep={"steps": 3, "gpuScales": [0.5, 1.0], "alphas": [0, 2]},
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert cli(["simulate", str(path), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    final = re.fullmatch(
        r"simulate calibration_error=nan rollflash rlvr=([0-9.]+)x agentic=nan "
        r"rollarc vs_sync=nan affinity=nan wall_s=([0-9.]+)",
        lines[-1],
    )
    assert final, lines[-1]
    assert float(final.group(1)) > 1
    assert any(line.startswith("| async over sync") for line in lines)
    for name in ("utilisation.png", "speedup_vs_alpha.png", "throughput_vs_gpus.png"):
        assert (out / name).stat().st_size > 1000


def test_simulate_command_reports_a_bad_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny(network={"weightSyncGBps": -1})))
    assert cli(["simulate", str(path)]) == 2
    assert "network.weightSyncGBps" in capsys.readouterr().err
