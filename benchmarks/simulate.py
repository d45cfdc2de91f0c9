"""The cluster simulator's benchmark, and the measurements its local calibration rests on.

    make bench-simulate
    .venv/bin/python benchmarks/simulate.py [--out simulate-out]   # = rollfleet simulate examples/clusters/cluster-3000.yaml
    .venv/bin/python benchmarks/simulate.py --measure               # this machine's costs (~1 min of CPU)

`--measure` times, on one torch thread as each local process runs, the pieces the local
cluster files (examples/clusters/local-*.yaml) take as measured inputs:
- the torch engine (the builtin 1.06 M-parameter Llama, float32): seconds per decode step
  at batch 1, 4, 16 and 64 (fitted to overhead + per-sequence cost), and per prefilled token;
- the trainer's `train_step` on 16 groups x 8 samples shaped like bench-async's two
  workloads (tokens per sample as the simulator's workloads draw them);
- an env session (open and close), an env step, and a reward call of 8 items: CPU seconds
  on the client's side and on the server's (the services' apps under uvicorn in their own
  process, over loopback, as `rollfleet run` starts them).
It prints the figures as YAML to paste into the cluster files.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")] + [
    str(ROOT / "services" / s) for s in ("rollout", "trainer", "env", "reward")
]


def _engine_costs(folder: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rollfleet_rollout.engine import GenerationRequest, SamplingParams, complete
    from rollfleet_rollout.torch_engine import TorchEngine

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    async def run(batch: int, prompt: int, new_tokens: int) -> float:
        # eos -1 is never sampled: every request runs to new_tokens.
        engine = TorchEngine(model, slots=64, max_len=128, eos_token_id=-1)
        await engine.start()
        params = SamplingParams(max_new_tokens=new_tokens)
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                complete(engine, GenerationRequest(f"r{i}", [1] + [5] * (prompt - 1), params))
                for i in range(batch)
            )
        )
        seconds = time.perf_counter() - t0
        await engine.stop()
        return seconds / max(engine.steps, 1)

    def median_step(batch: int, prompt: int, new_tokens: int) -> float:
        return statistics.median(asyncio.run(run(batch, prompt, new_tokens)) for _ in range(3))

    decode = {b: median_step(b, 10, 48) for b in (1, 4, 16, 64)}
    # Fit step = overhead + per_seq * batch by least squares over the batches.
    xs, ys = list(decode), list(decode.values())
    mx, my = statistics.mean(xs), statistics.mean(ys)
    per_seq = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    short, long_ = median_step(8, 8, 1), median_step(8, 88, 1)
    return {
        "decode_step_s": decode,
        "step_overhead_s": my - per_seq * mx,
        "decode_per_seq_s": per_seq,
        "prefill_per_token_s": (long_ - short) / (8 * 80),
    }


def _trainer_costs(folder: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollfleet.spec import parse_manifest
    from rollfleet_trainer.loop import Trainer
    from rollfleet_trainer.synthetic import synthetic_groups

    job = {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": "measure"},
        "spec": {"trainer": {"promptsPerStep": 16}, "rollout": {"sampling": {"groupSize": 8}}},
    }
    out = {}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(parse_manifest(job), None, Path(run_dir))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        trainer.set_model(model, AutoTokenizer.from_pretrained(folder))
        # (prompt, response) token ranges: countdown "3 5 7>12:" and its padded answers;
        # calculator's prompt and its two turns with the observation between them.
        for name, prompt, response in (("rlvr", (9, 11), (6, 30)), ("agentic", (8, 10), (14, 22))):
            times, tokens = [], 0
            for step in range(4):
                groups = synthetic_groups(step, 16, 8, model.config.vocab_size, prompt, response)
                t0 = time.perf_counter()
                trainer.train_step(groups)
                times.append(time.perf_counter() - t0)
                tokens = sum(
                    len(t.prompt_ids) + len(t.response_ids)
                    for g in groups
                    for t, _ in g.samples.values()
                )
            out[name] = {"train_step_s": statistics.median(times[1:]), "tokens": tokens}
    return out


SERVE = """
import sys, uvicorn
sys.path[:0] = {paths!r}
from rollfleet.tasks import make_task
from rollfleet_env.app import create_app as env_app
from rollfleet_reward.app import create_app as reward_app
app = env_app(make_task("calculator"), session_timeout=300) if sys.argv[1] == "env" else reward_app([("numeric", 1.0, {{}})])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
"""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (clock ticks of 1/100 s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _time_calls(app: str, port: int, pid: int) -> dict:
    """The worker's own client (httpx.AsyncClient) against one app."""
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(100):
            try:
                await http.get("/healthz")
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.1)

        async def calls(n: int, call) -> tuple[float, float]:
            for _ in range(n // 5):  # warm the connection pool and both processes' caches
                await call()
            c0, s0 = time.process_time(), _cpu_seconds(pid)
            for _ in range(n):
                await call()
            return (time.process_time() - c0) / n, (_cpu_seconds(pid) - s0) / n

        if app == "reward":
            items = [{"response": "a413", "answer": "413", "meta": {}}] * 8
            return {
                "reward_call": await calls(300, lambda: http.post("/score", json={"items": items}))
            }

        async def session(steps: int):
            meta = {"max_turns": steps + 1}
            sid = (await http.post("/sessions", json={"meta": meta})).json()["session_id"]
            for _ in range(steps):
                await http.post(f"/sessions/{sid}/step", json={"action": "c12*34;"})
            await http.delete(f"/sessions/{sid}")

        bare = await calls(300, lambda: session(0))
        stepped = await calls(300, lambda: session(2))
        step = tuple((b - a) / 2 for a, b in zip(bare, stepped, strict=True))
        return {"env_session": bare, "env_step": step}


def _service_costs() -> dict:
    """CPU seconds per call on each side, over loopback sockets to the real apps served
    by uvicorn in their own process (as `rollfleet run` starts them)."""
    paths = sys.path[: 1 + 4]
    out = {}
    for app, port in (("env", 18931), ("reward", 18932)):
        server = subprocess.Popen(
            [sys.executable, "-c", SERVE.format(paths=paths), app, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            out.update(asyncio.run(_time_calls(app, port, server.pid)))
        finally:
            server.terminate()
            server.wait()
    return out


def measure() -> None:
    import torch

    from rollfleet.models.tiny import create_tiny_model

    torch.set_num_threads(1)  # as each local worker and the trainer run
    with tempfile.TemporaryDirectory() as tmp:
        folder = create_tiny_model(Path(tmp) / "m", seed=0, max_len=128)
        engine = _engine_costs(folder)
        trainer = _trainer_costs(folder)
    services = _service_costs()
    print("# measured by benchmarks/simulate.py --measure (one torch thread)")
    for b, s in engine["decode_step_s"].items():
        print(f"# decode step at batch {b}: {s * 1000:.2f} ms")
    print(f"stepOverheadS: {engine['step_overhead_s']:.6f}")
    print(f"decodePerSequenceS: {engine['decode_per_seq_s']:.7f}")
    print(f"prefillPerTokenS: {engine['prefill_per_token_s']:.8f}")
    for name, t in trainer.items():
        print(f"# {name}: train_step {t['train_step_s'] * 1000:.1f} ms for {t['tokens']} tokens")
    for name, (client, server) in services.items():
        print(f"# {name}: client {client * 1000:.2f} ms + server {server * 1000:.2f} ms of CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="time this machine's costs")
    parser.add_argument("--out", default="simulate-out")
    args = parser.parse_args()
    if args.measure:
        measure()
        return
    from rollfleet.cli import main as cli

    sys.exit(
        cli(["simulate", str(ROOT / "examples/clusters/cluster-3000.yaml"), "--out", args.out])
    )


if __name__ == "__main__":
    main()
