"""Run the trainer: `python -m rollfleet_trainer` (started by `rollfleet run` or the operator).

With `trainer.workers` = 1 this process trains; with more it drives Ray Train, which runs
`run_trainer` on every rank (ray_train.py). Exits 0 when the job's steps are done (after
the leader wrote result.json to the run directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import torch
import transformers

from rollfleet.bus import Bus, nats_credentials
from rollfleet.plan import ServiceEnv
from rollfleet.service import make_app, serve_in_background, setup_logging
from rollfleet.spec import load_manifest
from rollfleet_trainer.backlog import watch_backlog
from rollfleet_trainer.loop import Trainer
from rollfleet_trainer.parallel import DataParallel


async def run_trainer(strategy: str = "ddp") -> None:
    """This process's trainer: the only one, or one rank of a process group."""
    dp = DataParallel.from_process_group(strategy)
    log = setup_logging("trainer" if dp.world == 1 else f"trainer-{dp.rank}")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    env = ServiceEnv.from_environ()
    job = load_manifest(env.job_file)
    torch.set_num_threads(int(os.environ.get("ROLLFLEET_TORCH_THREADS", "1")))
    torch.manual_seed(job.spec.seed)
    run_dir = Path(env.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    bus = await Bus.connect(
        env.nats_url, job.bus_name, name=f"trainer-{dp.rank}", credentials=nats_credentials()
    )
    trainer = Trainer(job, bus, run_dir, dp)
    http = backlog = None
    if dp.is_leader:  # one /metrics for the job: the leader's gauges are batch-wide
        app = make_app("trainer", health=lambda: {"step": trainer.state["step"]})
        http = await serve_in_background(app, env.http_port, env.http_host)
        routed = job.spec.rollout.routing == "affinity"
        pools = [p.name for p in job.spec.rollout.pools] if routed else None
        backlog = asyncio.create_task(watch_backlog(bus, dp.world, pools))
    try:
        await trainer.run()
    except Exception as e:
        log.exception("trainer failed")
        if dp.is_leader:
            await trainer.progress("Failed", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        if backlog is not None:
            backlog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await backlog
        await bus.close()
        if http is not None:
            await http.stop()


def main() -> None:
    env = ServiceEnv.from_environ()
    job = load_manifest(env.job_file)
    if job.spec.trainer.workers > 1:
        from rollfleet_trainer.ray_train import run_with_ray

        setup_logging("trainer")
        # SIGTERM (pod deletion, `rollfleet run` stopping) unwinds, so Ray is shut down.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        run_with_ray(job, env)
    else:
        asyncio.run(run_trainer())


if __name__ == "__main__":
    main()
