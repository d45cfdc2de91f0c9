"""A long run of the default job: does any process's memory, or NATS's backlog, grow?

    make bench-soak
    .venv/bin/python benchmarks/soak.py [--steps 2000] [--quick]

The default countdown job for `--steps` steps from one warm-up, checkpoints every 50 steps,
run by the local runtime in this process. Every 15 s a sampler reads each process's
resident memory (VmRSS of the child and everything in its session: a trainer's Ray
workers count as the trainer) and nats-server's, the messages stored in the job's streams
and the size of NATS's store on disk, with the trainer's step at that moment.

Growth compares the median of the samples in the last tenth of the steps with the median
of those between 20 % and 30 % (after warm-up: allocator pools, compiled kernels and the
first checkpoint are in place by then). Ends with `soak steps=<n> rss_growth_max=<x>%
(<process>) nats_messages=<median early>-><median late> nats_store_growth=<y>%`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
from pathlib import Path

import harness

SAMPLE_EVERY_S = 15.0


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def store_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Sampler(threading.Thread):
    def __init__(self, run):
        super().__init__(daemon=True)
        self.run_, self.samples, self.done = run, [], threading.Event()

    async def messages(self, bus) -> int:
        s = bus.subjects
        names = (s.task_stream, s.trajectory_stream, s.deadletter_stream)
        return sum([(await bus.js.stream_info(n)).state.messages for n in names])

    def run(self):
        asyncio.run(self.sample())

    async def sample(self):
        from rollfleet.bus import Bus
        from rollfleet.local.runtime import session_members

        while not self.done.wait(SAMPLE_EVERY_S):
            if not (self.run_.nats and (self.run_.run_dir / "metrics.jsonl").exists()):
                continue
            bus = await Bus.connect(
                self.run_.nats.url,
                self.run_.job.bus_name,
                name="soak",
                credentials=self.run_.nats_creds,
            )
            try:
                messages = await self.messages(bus)
            finally:
                await bus.close()
            rss = {
                c.name: rss_bytes(session_members(c.process.pid) or [c.process.pid])
                for c in list(self.run_.children)
            }
            rss["nats-server"] = rss_bytes([self.run_.nats.process.pid])
            self.samples.append(
                {
                    "step": harness.current_step(self.run_.run_dir),
                    "rss": rss,
                    "messages": messages,
                    "store": store_bytes(self.run_.run_dir / "nats"),
                }
            )


def growth(samples: list[dict], steps: int, value) -> tuple[float, float]:
    """Medians of `value(sample)` over the 20-30 % window and over the last tenth."""
    early = [value(s) for s in samples if 0.2 * steps <= s["step"] < 0.3 * steps]
    late = [value(s) for s in samples if s["step"] >= 0.9 * steps]
    if not early or not late:
        raise SystemExit(f"too few samples ({len(samples)}) for {steps} steps: run longer")
    return statistics.median(early), statistics.median(late)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="300 steps: shows it works")
    parser.add_argument("--out", type=Path, help="write the samples here as JSON")
    args = parser.parse_args()
    steps = 300 if args.quick else args.steps
    harness.quiet()
    from rollfleet.local.runtime import LocalRun
    from rollfleet.spec import parse_manifest

    job = harness.example("countdown.yaml")
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        folder = harness.warm_up(job, Path(tmp) / "warmup")
        arm = harness.from_model(job, folder, steps, checkpoint={"every": 50}, name="soak")
        run = LocalRun(parse_manifest(arm), Path(tmp) / "run", show_progress=False)
        sampler = Sampler(run)
        sampler.start()
        try:
            result = run.run()
        finally:
            sampler.done.set()
            sampler.join()
    samples = sampler.samples
    if args.out:
        args.out.write_text(json.dumps(samples, indent=2))
    print(f"\n{harness.machine()}")
    print(f"{steps} steps in {result['rl_seconds']:.0f} s of RL, {len(samples)} samples")
    print(f"{'process':<22}{'early MiB':>10}{'late MiB':>10}{'growth':>8}")
    worst = ("", -1.0)
    for name in samples[-1]["rss"]:
        early, late = growth(samples, steps, lambda s, n=name: s["rss"].get(n, 0))
        change = late / early - 1 if early else 0.0
        worst = max(worst, (name, change), key=lambda x: x[1])
        print(f"{name:<22}{early / 2**20:>10.0f}{late / 2**20:>10.0f}{change:>8.1%}")
    messages = growth(samples, steps, lambda s: s["messages"])
    store = growth(samples, steps, lambda s: s["store"])
    print(
        f"NATS messages stored {messages[0]:.0f} -> {messages[1]:.0f}; "
        f"store {store[0] / 2**20:.1f} -> {store[1] / 2**20:.1f} MiB"
    )
    print(
        f"soak steps={steps} rss_growth_max={worst[1]:.1%} ({worst[0]}) "
        f"nats_messages={messages[0]:.0f}->{messages[1]:.0f} "
        f"nats_store_growth={store[1] / store[0] - 1:.1%}"
    )


if __name__ == "__main__":
    main()
