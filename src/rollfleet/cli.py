"""The `rollfleet` command.

rollfleet run examples/countdown.yaml     # the whole job on this machine
rollfleet run --resume runs/countdown-20260101-120000
rollfleet validate FILE                   # check a manifest, print the resolved spec
rollfleet plan FILE                       # the components it would run
rollfleet crd                             # the RLJob CustomResourceDefinition (YAML)
rollfleet export RUN_DIR OUT [--step N]   # a checkpoint as a Hugging Face model folder
rollfleet nats-keys OUT_DIR               # NATS operator-mode keys for a cluster + kubectl line
rollfleet simulate CLUSTER.yaml           # the job on a GPU cluster, simulated
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import time
from pathlib import Path

import yaml

from rollfleet.spec import ManifestError, load_manifest


def _run(args) -> int:
    from rollfleet.local.runtime import LocalRun, RunFailed

    if args.resume:
        run_dir = Path(args.resume)
        job = load_manifest(run_dir / "job.yaml")
    else:
        if not args.file:
            raise SystemExit("rollfleet run: give a manifest file, or --resume RUN_DIR")
        job = load_manifest(args.file)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = (
            Path(args.run_dir) if args.run_dir else Path("runs") / f"{job.metadata.name}-{stamp}"
        )
        if run_dir.exists() and any(run_dir.iterdir()):
            raise SystemExit(
                f"rollfleet run: {run_dir} is not empty; use --resume {run_dir} to continue it"
            )
    _check_inputs(job)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run directory: {run_dir}", file=sys.stderr)
    # `kill` (SIGTERM) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        result = LocalRun(job, run_dir, show_progress=not args.quiet).run()
    except RunFailed as e:
        print(f"rollfleet run failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; every process stopped. Continue with: rollfleet run --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
    print(
        f"metrics: {run_dir / 'metrics.jsonl'}  curve: {run_dir / 'reward_curve.png'}  logs: {run_dir / 'logs'}"
    )
    if result.get("restarts"):
        restarted = ", ".join(f"{name} x{n}" for name, n in sorted(result["restarts"].items()))
        print(f"restarted after a crash: {restarted}")
    print(
        f"result: heldout_accuracy before={result['heldout_before']:.3f} after={result['heldout_after']:.3f} "
        f"steps={result['steps']} samples={result['samples']}"
    )
    return 0


PROMPTS_CHECKED = 256  # examples per split whose prompts must fit the model's context


def _check_inputs(job) -> None:
    """Fail before anything starts on inputs that only exist at run time (files)."""
    from rollfleet.tasks import make_task

    spec = job.spec
    if spec.trainer.workers > 1 and importlib.util.find_spec("ray") is None:
        raise ManifestError(
            "spec.trainer.workers > 1 trains with Ray Train, which is not installed: "
            "pip install 'rollfleet[trainer]' (or set spec.trainer.workers: 1)"
        )
    if spec.suspend:
        raise ManifestError("spec.suspend is true: a suspended job does not run; set it to false")
    from rollfleet.models.source import ModelSourceError, model_folder

    try:  # model.huggingface is fetched into the cache now: the trainer finds it there
        own = model_folder(spec.model)
    except ModelSourceError as e:
        raise ManifestError(str(e)) from None
    if own is not None:
        field = "spec.model.path" if spec.model.path else "spec.model.huggingface"
        _check_model_folder(str(own), spec.model.maxLength, field)
    try:
        task = make_task(spec.task.name, spec.task.params, spec.seed)
        prompts = [
            task.example(split, i).prompt
            for split in ("train", "heldout")
            for i in range(_count(task.size(split)))
        ]
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise ManifestError(f"spec.task: {e}") from None
    _check_context(spec, prompts, own)


def _count(size: int | None) -> int:
    """Examples of a split to check: all of a small one, PROMPTS_CHECKED of the others."""
    return PROMPTS_CHECKED if size is None else min(size, PROMPTS_CHECKED)


def _check_model_folder(path: str, max_length: int, field: str = "spec.model.path") -> None:
    """The job's model must be a Hugging Face folder the trainer can load (a config of a
    registered architecture, the fast tokenizer, weights) whose positions cover
    model.maxLength; otherwise the trainer would fail on it after everything started."""
    from rollfleet.models.architectures import ARCHITECTURES

    folder, where = Path(path), f"{field}: {path!r}"
    if not folder.is_dir():
        what = "is a file, not" if folder.exists() else "does not exist; it should be"
        raise ManifestError(f"{where} {what} a Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise ManifestError(f"{where} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads((folder / "config.json").read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ManifestError(f"{where}: config.json is not JSON ({e})") from None
    registered = sorted({a.model_type for a in ARCHITECTURES.values()})
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in registered:
        raise ManifestError(
            f"{where}: config.json's model_type {model_type!r} has no registered "
            f"architecture; registered: {registered}"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ManifestError(
            f"{where} has no tokenizer.json (the fast tokenizer every process loads)"
        )
    if not [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]:
        raise ManifestError(f"{where} holds no weights (*.safetensors)")
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and max_length > positions:
        raise ManifestError(
            f"spec.model.maxLength ({max_length}) exceeds the max_position_embeddings "
            f"({positions}) of {where}: lower model.maxLength"
        )


def _check_context(spec, prompts: list[str], own: Path | None) -> None:
    """The task's longest prompt and rollout.sampling.maxNewTokens together must fit
    model.maxLength, the context the engines give a sample (spec.py checks that
    maxNewTokens alone does). `own`: the job's model folder, None for the builtin one."""
    if own is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(own / "tokenizer.json"))
        lengths = [len(e.ids) for e in tokenizer.encode_batch(prompts, add_special_tokens=False)]
    else:
        lengths = [len(p) for p in prompts]  # the builtin tokenizer: one token per character
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    needed = lengths[longest] + 1  # the beginning-of-sequence token
    new, context = spec.rollout.sampling.maxNewTokens, spec.model.maxLength
    if needed + new > context:
        raise ManifestError(
            f"spec.rollout.sampling.maxNewTokens ({new}) and the task's longest prompt "
            f"({needed} tokens: {prompts[longest][:40]!r}) exceed spec.model.maxLength "
            f"({context}), the model's context: lower maxNewTokens or raise maxLength"
        )


def _validate(args) -> int:
    job = load_manifest(args.file)
    _check_inputs(job)
    print(
        yaml.safe_dump(
            job.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False
        ),
        end="",
    )
    return 0


def _plan(args) -> int:
    from rollfleet.plan import Endpoints, plan

    job = load_manifest(args.file)
    endpoints = Endpoints(
        "nats://nats:4222",
        "http://reward",
        "http://env",
        "/var/lib/rollfleet",
        "/etc/rollfleet/job.yaml",
    )
    for c in plan(job, endpoints):
        print(
            json.dumps(
                {
                    "name": c.name,
                    "role": c.role,
                    "replicas": c.replicas,
                    "command": c.command(),
                    "resources": c.resources,
                    "placement": c.placement,
                }
            )
        )
    return 0


def _export(args) -> int:
    from rollfleet_trainer.export import ExportError, export_checkpoint, start_folder

    run_dir = Path(args.run_dir)
    try:
        start = start_folder(run_dir, Path(args.job) if args.job else None)
        where = export_checkpoint(run_dir, args.out, start, step=args.step)
    except ExportError as e:
        print(f"rollfleet export: {e}", file=sys.stderr)
        return 2
    print(f"exported to {where}")
    return 0


def _crd(args) -> int:
    from rollfleet.crd import render_crd

    print(render_crd(), end="")
    return 0


def _nats_keys(args) -> int:
    from rollfleet import nats_auth

    out = Path(args.out_dir)
    if (out / nats_auth.SIGNING_SEED).exists():
        raise SystemExit(
            f"rollfleet nats-keys: {out} already holds keys; jobs minted with them would be "
            "locked out by new ones: choose another folder, or delete it first"
        )
    nats_auth.NatsKeys.create().write(out)
    files = " ".join(
        f"--from-file={name}={out / name}"
        for name in (nats_auth.SERVER_CONFIG, nats_auth.SIGNING_SEED, nats_auth.ACCOUNT_ID)
    )
    print(
        f"wrote NATS keys to {out} (files only you can read):\n"
        f"  {nats_auth.SERVER_CONFIG}: nats-server's settings (operator mode, JWTs, no seed)\n"
        f"  {nats_auth.SIGNING_SEED}, {nats_auth.ACCOUNT_ID}: what the rollfleet operator "
        "mints each job's NATS user with\n"
        f"  {nats_auth.OPERATOR_SEED}, {nats_auth.ACCOUNT_SEED}, {nats_auth.SYSTEM_SEED}: "
        "the root keys; keep them offline\n"
        "Create the Secret the chart reads (value natsAuth.secretName), in the chart's namespace:\n\n"
        f"  kubectl -n {args.namespace} create secret generic {args.secret} {files}"
    )
    return 0


def _simulate(args) -> int:
    from rollfleet.simulate.report import run_command

    return run_command(args.file, args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rollfleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job locally: every service a process, NATS embedded")
    run.add_argument("file", nargs="?", help="RLJob manifest (YAML)")
    run.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint"
    )
    run.add_argument("--run-dir", help="where outputs go (default runs/<name>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(fn=_run)
    for name, fn, text in (
        ("validate", _validate, "check a manifest"),
        ("plan", _plan, "print the components"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("file")
        p.set_defaults(fn=fn)
    sub.add_parser("crd", help="print the RLJob CustomResourceDefinition").set_defaults(fn=_crd)
    export = sub.add_parser(
        "export", help="a checkpoint as a Hugging Face model folder (or fsspec URL)"
    )
    export.add_argument("run_dir", help="the run directory (its checkpoints/)")
    export.add_argument("out", help="a folder, or an fsspec URL such as s3://bucket/policy")
    export.add_argument(
        "--step", type=int, help="the checkpoint of this step (default: the newest)"
    )
    export.add_argument("--job", help="the job's manifest, where the run directory has none")
    export.set_defaults(fn=_export)
    keys = sub.add_parser("nats-keys", help="make NATS keys for a cluster (per-job NATS users)")
    keys.add_argument("out_dir", metavar="OUT_DIR", help="where the keys go (a new folder)")
    keys.add_argument("--namespace", default="rollfleet", help="the chart's namespace")
    keys.add_argument("--secret", default="rollfleet-nats-auth", help="the Secret's name")
    keys.set_defaults(fn=_nats_keys)
    sim = sub.add_parser("simulate", help="simulate the job on a cluster (CLUSTER.yaml)")
    sim.add_argument("file", help="cluster file (examples/clusters/)")
    sim.add_argument("--out", default="simulate-out", help="folder for the plots")
    sim.set_defaults(fn=_simulate)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ManifestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
