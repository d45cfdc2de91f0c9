"""What the benchmarks share: jobs as manifests, one warm-up for all runs of a comparison,
`rollfleet run` of a job with its results, and the machine they ran on.

    from harness import example, from_model, load_model, run_job, warm_up
    job = example("countdown.yaml")
    folder = warm_up(job, tmp / "warmup")        # the trainer's own warm-up, once
    run = run_job(from_model(job, folder, steps=50), tmp / "run")
    run["result"]["heldout_after"], run["records"][-1]["mean_reward"]
    model, tokenizer = load_model(folder, tmp / "run")  # the run's final policy
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "services" / "trainer")]
ROLLFLEET = Path(sys.executable).parent / "rollfleet"


def quiet() -> None:
    """No progress bars from transformers (saving and loading the tiny model) in the output."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def example(name: str) -> dict:
    """An examples/ manifest as a dict."""
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def merged(job: dict, spec: dict, name: str | None = None) -> dict:
    """A copy of `job` with `spec`'s sections merged into its spec, one level deep (a
    section's fields replace the job's; a None value removes the section)."""
    out = copy.deepcopy(job)
    target = out["spec"]
    for key, value in spec.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = {**target[key], **copy.deepcopy(value)}
        else:
            target[key] = copy.deepcopy(value)
    if name:
        out["metadata"]["name"] = name
    return out


@contextlib.contextmanager
def single_thread():
    """The trainer's set-up (ROLLFLEET_TORCH_THREADS=1) for warm-up and evaluation."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def warm_up(job: dict, folder: Path) -> Path:
    """The job's warm-up SFT, by the trainer's own code: an HF model folder that every run
    of a comparison then starts from (`model.path`)."""
    from rollfleet.spec import parse_manifest
    from rollfleet_trainer.model import prepare_policy

    with single_thread():
        _, _, model_folder = prepare_policy(parse_manifest(job).spec, folder)
    return model_folder


def from_model(
    job: dict,
    folder: Path,
    steps: int,
    name: str | None = None,
    seed: int | None = None,
    **sections,
) -> dict:
    """`job` as one arm of a comparison: RL from the model folder `folder` (warm-up done)
    for `steps` steps, no evaluation during the run, a checkpoint only at the end, with
    sampling seed `seed` (rollout.sampling.seed) when given; `sections` merged on top
    (see `merged`)."""
    arm = {
        "model": {"path": str(folder), "warmup": {"steps": 0}},
        "trainer": {"steps": steps, "evalEvery": 0},
        "checkpoint": {"every": 100_000},
    }
    if seed is not None:
        arm["rollout"] = {"sampling": {**job["spec"]["rollout"]["sampling"], "seed": seed}}
    return merged(merged(job, arm), sections, name=name)


def load_model(folder: Path, run_dir: Path | None = None):
    """The model folder's model in eval mode, with a run's last checkpoint loaded into it
    when `run_dir` is given; and its tokenizer."""
    from rollfleet_trainer.checkpoint import latest_checkpoint, read_checkpoint
    from rollfleet_trainer.model import load_folder

    model, tokenizer = load_folder(folder)
    if run_dir is not None:
        state, _, _ = read_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
        model.load_state_dict(state, strict=False)  # a tied lm_head is not stored
    return model.eval(), tokenizer


def run_job(job: dict, run_dir: Path) -> dict:
    """`rollfleet run` of `job` (the whole local runtime); its result.json, metrics.jsonl
    records and wall time. Exits with the run's log tail if it fails."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    started = time.monotonic()
    done = subprocess.run(
        [str(ROLLFLEET), "run", str(path), "--run-dir", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.exit(f"rollfleet run {path.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {
        "result": json.loads((run_dir / "result.json").read_text()),
        "records": [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()],
        "wall": time.monotonic() - started,
    }


def current_step(run_dir: Path) -> int:
    """The trainer's step as its last metrics.jsonl line says (0 before the first)."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


class MetricsSampler(threading.Thread):
    """Keeps the last /metrics text of each child of a local run in `roles` (read every
    second while it runs: counters end where the run did)."""

    def __init__(self, run, roles: tuple[str, ...]):
        super().__init__(daemon=True)
        self.run_, self.roles, self.texts, self.done = run, roles, {}, threading.Event()

    def run(self):
        import httpx

        while not self.done.wait(1.0):
            for child in list(self.run_.children):
                if child.role in self.roles:
                    with contextlib.suppress(httpx.HTTPError):
                        url = f"http://127.0.0.1:{child.http_port}/metrics"
                        self.texts[child.name] = httpx.get(url, timeout=1).text

    def total(self, metric: str, *labels: str) -> dict[tuple, float]:
        """`metric`'s samples summed over the children, by the values of `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[tuple, float] = {}
        for text in self.texts.values():
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == metric:
                        key = tuple(sample.labels.get(k, "") for k in labels)
                        out[key] = out.get(key, 0.0) + sample.value
        return out


def run_sampled(job: dict, run_dir: Path, roles: tuple[str, ...]) -> tuple[dict, MetricsSampler]:
    """The local runtime in this process (`rollfleet run`'s own code) on `job`: its
    result.json, and the children's last metrics."""
    from rollfleet.local.runtime import LocalRun
    from rollfleet.spec import parse_manifest

    run = LocalRun(parse_manifest(job), run_dir, show_progress=False)
    sampler = MetricsSampler(run, roles)
    sampler.start()
    try:
        result = run.run()
    finally:
        sampler.done.set()
    return result, sampler


def heldout_items(model, tokenizer, job: dict, verifier: str, stages: bool = False) -> list[dict]:
    """The model's greedy held-out episodes of `job`'s task, each as the item the reward
    service would score (`rewards.reward_item`: response, answer, meta, transcript);
    `stages`: through the job's methods (their episode runner), as the workers run them."""
    from rollfleet.evaluation import heldout_episodes
    from rollfleet.methods import Stages
    from rollfleet.protocol import RolloutTask
    from rollfleet.rewards import reward_item
    from rollfleet.spec import parse_manifest
    from rollfleet.tasks import make_task

    spec = parse_manifest(job).spec
    task = make_task(spec.task.name, spec.task.params, spec.seed)
    with single_thread():
        scored = heldout_episodes(
            model,
            tokenizer,
            task,
            verifier,
            max_new_tokens=spec.rollout.sampling.maxNewTokens,
            limit=spec.task.heldoutLimit,
            max_length=spec.model.maxLength,
            stages=Stages.for_spec(spec) if stages else None,
        )
    return [
        reward_item(
            RolloutTask.for_example(
                task.example("heldout", index), index=index, group_id=str(index), samples=1
            ),
            episode,
        )
        for index, (_, episode) in enumerate(scored)
    ]


def heldout_table(results: dict[str, list[dict]], **columns: str) -> dict[str, dict[str, float]]:
    """Print the arms' held-out table (avg@4 per seed, its mean, the greedy mean, and the
    mean of each extra `columns` entry: title=key of a run's dict); return the means, by
    key, then arm (`heldout_after`, `heldout_greedy_after` and the extra keys)."""
    import statistics

    keys = ["heldout_after", "heldout_greedy_after", *columns.values()]
    titles = ["greedy mean", *(title.replace("_", " ") for title in columns)]
    print("\n| arm | held-out avg@4 per seed | mean | " + " | ".join(titles) + " |")
    print("|---" * (3 + len(titles)) + "|")
    means = {key: {} for key in keys}
    for arm, runs in results.items():
        for key in keys:
            means[key][arm] = statistics.mean(r[key] for r in runs)
        per_seed = " / ".join(f"{r['heldout_after']:.3f}" for r in runs)
        figures = " | ".join(f"{means[key][arm]:.3f}" for key in keys)
        print(f"| {arm} | {per_seed} | {figures} |")
    return means


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} cores ({cpu}), no GPU"
