"""Run the reward service: `python -m rollfleet_reward` (started by `rollfleet run` or the operator)."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from rollfleet.plan import ServiceEnv
from rollfleet.service import setup_logging, uvicorn_config
from rollfleet.spec import load_manifest
from rollfleet_reward.app import create_app


def main() -> None:
    setup_logging("reward")
    env = ServiceEnv.from_environ()
    job = load_manifest(env.job_file)
    cache = Path(env.run_dir) / "reward-models"
    reward = job.spec.reward
    app = create_app(
        job.spec.reward_functions(),
        reward.models,
        cache,
        latency_ms=reward.latencyMs,
        latency_tail=reward.latencyTail,
        seed=job.spec.seed * 1000 + env.replica,
    )
    uvicorn.Server(uvicorn_config(app, env.http_port, env.http_host)).run()


if __name__ == "__main__":
    main()
