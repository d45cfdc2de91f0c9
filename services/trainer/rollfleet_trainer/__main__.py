"""Run the trainer: `python -m rollfleet_trainer` (started by `rollfleet run` or the operator).

Exits 0 when the job's steps are done (after writing result.json to the run directory).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import torch
import transformers

from rollfleet.bus import Bus, nats_token
from rollfleet.plan import ServiceEnv
from rollfleet.service import make_app, serve_in_background, setup_logging
from rollfleet.spec import load_manifest
from rollfleet_trainer.loop import Trainer


async def amain() -> None:
    log = setup_logging("trainer")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    env = ServiceEnv.from_environ()
    job = load_manifest(env.job_file)
    torch.set_num_threads(int(os.environ.get("ROLLFLEET_TORCH_THREADS", "1")))
    torch.manual_seed(job.spec.seed)
    run_dir = Path(env.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    bus = await Bus.connect(env.nats_url, job.metadata.name, name="trainer", token=nats_token())
    trainer = Trainer(job, bus, run_dir)
    app = make_app("trainer", health=lambda: {"step": trainer.state["step"]})
    http = await serve_in_background(app, env.http_port, env.http_host)
    try:
        await trainer.run()
    except Exception as e:
        log.exception("trainer failed")
        await trainer.progress("Failed", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        await bus.close()
        await http.stop()


def main() -> None:
    asyncio.run(amain())


if __name__ == "__main__":
    main()
