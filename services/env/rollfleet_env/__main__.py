"""Run the env-sandbox service: `python -m rollfleet_env` (started by `rollfleet run` or the operator)."""

from __future__ import annotations

import functools

import uvicorn

from rollfleet.plan import ServiceEnv
from rollfleet.service import setup_logging, uvicorn_config
from rollfleet.spec import load_manifest
from rollfleet.tasks import make_task
from rollfleet_env.app import create_app


def main() -> None:
    setup_logging("env")
    env = ServiceEnv.from_environ()
    spec = load_manifest(env.job_file).spec
    app = create_app(
        # Each sandbox process builds the task itself (a search index does not pickle).
        functools.partial(make_task, spec.task.name, spec.task.params, spec.seed),
        session_timeout=spec.env.sessionTimeoutSeconds,
        step_timeout=spec.env.stepTimeoutSeconds,
        step_memory_mb=spec.env.stepMemoryMB,
        sandboxes=spec.env.sandboxes,
        step_latency_ms=spec.env.stepLatencyMs,
        latency_tail=spec.env.latencyTail,
        seed=spec.seed + env.replica,
    )
    uvicorn.Server(uvicorn_config(app, env.http_port, env.http_host)).run()


if __name__ == "__main__":
    main()
