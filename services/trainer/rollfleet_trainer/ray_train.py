"""Several trainer workers: Ray Train's TorchTrainer runs the training loop on each rank.

`python -m rollfleet_trainer` calls `run_with_ray` when `trainer.workers` > 1. In a
cluster (a KubeRay RayJob sets RAY_ADDRESS) it joins that Ray cluster; on one machine
(`rollfleet run`) it starts a local Ray instance bound to 127.0.0.1 with its temp dir in
the run directory and authentication off (nothing listens beyond loopback), and stops it
after.

Ray Train makes the torch.distributed process group (gloo on CPU, NCCL on GPU); each rank
runs `Trainer.run` (loop.py) with a `DataParallel` for its rank. Rank 0 serves the
trainer's /healthz and /metrics on ROLLFLEET_HTTP_PORT.

    RAY_ADDRESS=... python -m rollfleet_trainer      # what the RayJob's entrypoint runs
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path

from rollfleet.plan import ServiceEnv
from rollfleet.spec import RLJob

log = logging.getLogger("trainer")

# AF_UNIX socket paths are limited to 107 bytes, and Ray puts its sockets under its temp
# dir: a run directory deeper than this is reached through a short symlink in /tmp.
_MAX_RAY_TEMP_DIR = 40

# Read by Ray when it is imported. The second makes Ray take 127.0.0.1 as the node address
# and bind its servers (GCS, raylet, workers) there instead of the machine's routable one;
# with nothing reachable from outside, authentication is off and no token file is written.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# gloo's connections between the ranks, on loopback too (Linux names it lo). torch's
# rendezvous store (TCPStore) on rank 0 still listens on every interface: torch offers no
# bind address for it.
LOOPBACK_INTERFACE = "lo"


def use_local_ray() -> None:
    """Configure a single-machine Ray on loopback; call it before Ray is imported."""
    os.environ.update(LOCAL_RAY_ENV)
    if Path(f"/sys/class/net/{LOOPBACK_INTERFACE}").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)


def _start_local_ray(run_dir: Path, workers: int, gpus: int) -> Path | None:
    """Start Ray on loopback with its files in <run dir>/ray; returns a symlink to remove."""
    use_local_ray()
    import ray

    temp_dir = (run_dir / "ray").resolve()
    temp_dir.mkdir(parents=True, exist_ok=True)
    link = None
    if len(str(temp_dir)) > _MAX_RAY_TEMP_DIR:
        link = Path(tempfile.mkdtemp(prefix="rf-ray-")) / "r"
        link.symlink_to(temp_dir)
    ray.init(
        address="local",
        include_dashboard=False,
        _temp_dir=str(link or temp_dir),
        num_cpus=max(workers, os.cpu_count() or 1),
        num_gpus=gpus,
        log_to_driver=True,
    )
    if (address := ray.util.get_node_ip_address()) != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(
            f"the local Ray instance took the address {address}, not 127.0.0.1: Ray was "
            "imported before rollfleet_trainer.ray_train.use_local_ray() was called"
        )
    return link


def _rank_main(config: dict) -> None:
    """The body of each Ray Train worker: one rank's training loop."""
    from rollfleet_trainer.__main__ import run_trainer

    os.environ.update(config["env"])
    # Ray starts workers in its own folder; on the driver's machine, work where it does, so
    # relative paths in the job (a task's data file, say) mean the same on every rank.
    if Path(config["cwd"]).is_dir():
        os.chdir(config["cwd"])
    asyncio.run(run_trainer(config["strategy"]))


def run_with_ray(job: RLJob, env: ServiceEnv) -> None:
    trainer_spec = job.spec.trainer
    run_dir = Path(env.run_dir)
    in_cluster = bool(os.environ.get("RAY_ADDRESS"))
    link = (
        None
        if in_cluster
        else _start_local_ray(run_dir, trainer_spec.workers, trainer_spec.gpusPerWorker)
    )
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if in_cluster:
        ray.init()
    log.info(
        "Ray Train: %d workers (%s, %s)",
        trainer_spec.workers,
        trainer_spec.strategy,
        "NCCL on GPU" if trainer_spec.gpusPerWorker else "gloo on CPU",
    )
    try:
        TorchTrainer(
            _rank_main,
            # Non-secret settings travel in the config; secrets (tokens) stay in the
            # environment each worker gets from its pod (or, locally, inherits).
            train_loop_config={
                "env": env.to_env(),
                "strategy": trainer_spec.strategy,
                "cwd": os.getcwd(),
            },
            scaling_config=ScalingConfig(
                num_workers=trainer_spec.workers,
                use_gpu=trainer_spec.gpusPerWorker > 0,
                resources_per_worker={"CPU": 1, "GPU": trainer_spec.gpusPerWorker}
                if trainer_spec.gpusPerWorker
                else {"CPU": 1},
            ),
            run_config=RunConfig(
                storage_path=str((run_dir / "ray-results").resolve()),
                name=job.metadata.name,
                failure_config=FailureConfig(
                    max_failures=0
                ),  # the job's own resume handles restarts
            ),
        ).fit()
    finally:
        ray.shutdown()
        if link is not None:
            link.unlink(missing_ok=True)
            link.parent.rmdir()
