"""Run a rollout worker: `python -m rollfleet_rollout` (started by `rollfleet run` or the operator).

The pool (ROLLFLEET_POOL) picks the engine and batch size from the job's spec.
"""

from __future__ import annotations

import asyncio
import os

from rollfleet.bus import Bus, nats_credentials
from rollfleet.models.architectures import architecture_of
from rollfleet.plan import ServiceEnv
from rollfleet.service import setup_logging
from rollfleet.spec import load_manifest
from rollfleet_rollout.worker import RolloutWorker


def engine_factory(pool, spec, seed: int):
    def make(model, tokenizer, version: int):
        reprefill = spec.async_.partialRollout == "reprefill"
        if pool.engine == "vllm":
            from rollfleet_rollout.vllm_engine import VllmEngine

            arch = architecture_of(model)
            if not arch.vllm:
                raise ValueError(
                    f"spec.rollout.pools[{pool.name}].engine: vllm cannot serve the "
                    f"{arch.name} architecture; use engine: torch for this pool"
                )

            return VllmEngine.from_model(
                model,
                tokenizer,
                version=version,
                max_len=spec.model.maxLength,
                seed=seed,
                slots=pool.maxBatch,
                tensor_parallel=pool.gpusPerReplica,
                reprefill=reprefill,
            )
        from rollfleet_rollout.torch_engine import TorchEngine

        return TorchEngine(
            model,
            slots=pool.maxBatch,
            max_len=spec.model.maxLength,
            eos_token_id=tokenizer.eos_token_id,
            seed=seed,
            version=version,
            reprefill_on_swap=reprefill,
        )

    return make


async def amain() -> None:
    env = ServiceEnv.from_environ()
    job = load_manifest(env.job_file)
    pool = next((p for p in job.spec.rollout.pools if p.name == env.pool), None)
    if pool is None:
        raise SystemExit(f"ROLLFLEET_POOL={env.pool!r} names no pool in spec.rollout.pools")
    name = f"{pool.name}-{env.replica}"
    log = setup_logging(f"rollout-{name}")
    if pool.engine == "vllm":
        from rollfleet_rollout.vllm_engine import require_vllm

        require_vllm()
    import torch

    torch.set_num_threads(int(os.environ.get("ROLLFLEET_TORCH_THREADS", "1")))
    torch.manual_seed(job.spec.sampling_seed() + 1000 + env.replica)
    bus = await Bus.connect(
        env.nats_url, job.bus_name, name=f"rollout-{name}", credentials=nats_credentials()
    )
    worker = RolloutWorker(job.spec, pool, env, bus, name)
    log.info("starting (engine=%s, slots=%d)", pool.engine, pool.maxBatch)
    await worker.run(engine_factory(pool, job.spec, job.spec.sampling_seed() * 100 + env.replica))


def main() -> None:
    asyncio.run(amain())


if __name__ == "__main__":
    main()
