"""`rollfleet simulate CLUSTER.yaml`: run a cluster file, its sweeps and claims; print and plot.

    rollfleet simulate examples/clusters/cluster-3000.yaml [--out simulate-out]

1. The file as written: samples/s, step time, idle shares, staleness, routing per pool,
   utilisation per device class (and over time: utilisation.png).
2. Sweeps of the same job (shorter runs, `sweep.steps`): speedup against α
   (speedup_vs_alpha.png) and samples/s against the devices used, synchronous and as
   written (throughput_vs_gpus.png).
3. Claims: each claim of this file and of every file under `validate` runs its variant and
   its baseline and compares the ratio of their samples/s with the paper's figure (or a
   measured one, for the local calibration): a range counts as met inside it. A
   calibration claim lists several measured runs; its error is against the first.
Ends with one line (calibration_error: the largest calibration error; wall_s: the wall
time of the file as written, e.g. 3,000 GPUs and a million trajectories, not of the
sweeps and claims): `simulate calibration_error=<max %> rollflash rlvr=<x>x
agentic=<y>x rollarc vs_sync=<a>x affinity=<b>x wall_s=<t>`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rollfleet.simulate.config import Cluster, deep_merge, load_cluster, read_raw
from rollfleet.simulate.sim import Result, simulate


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Runs:
    """Simulations by (file, variant, overrides), each run once."""

    def __init__(self):
        self.cache: dict[tuple, Result] = {}

    def get(
        self, path: Path, variant: str = "main", overrides: dict | None = None, label: str = ""
    ) -> Result:
        key = (str(path), variant, repr(overrides))
        if key not in self.cache:
            cluster = load_cluster(path, variant, overrides)
            result = simulate(cluster)
            log(
                f"  {path.name} {variant} {label}: {result.samples_per_s:.1f} samples/s "
                f"({result.steps} steps, {result.samples} samples, {result.events} events, "
                f"{result.wall_s:.1f} s)"
            )
            self.cache[key] = result
        return self.cache[key]


@dataclass
class ClaimRow:
    key: str
    what: str
    kind: str
    simulated: float
    paper: list[float]
    error: float  # relative distance to the figure (a range: to its nearest end; 0 inside)
    errors: list[float]  # against each figure, for several measured runs
    source: str
    file: str


def claim_error(value: float, paper: list[float]) -> float:
    """Relative distance to the figure; for a range [low, high], to its nearer end."""
    if len(paper) == 2:
        low, high = sorted(paper)
        if low <= value <= high:
            return 0.0
        target = low if value < low else high
    else:
        target = paper[0]
    return abs(value - target) / target


def run_claims(path: Path, runs: Runs) -> list[ClaimRow]:
    cluster = load_cluster(path)
    rows = []
    for claim in cluster.file.claims:
        ratio = (
            runs.get(path, claim.variant).samples_per_s
            / runs.get(path, claim.baseline).samples_per_s
        )
        if claim.kind == "calibration":
            errors = [abs(ratio - p) / p for p in claim.paper]
            error = errors[0]
        else:
            error, errors = claim_error(ratio, claim.paper), []
        rows.append(
            ClaimRow(
                claim.key,
                claim.what,
                claim.kind,
                ratio,
                claim.paper,
                error,
                errors,
                claim.source,
                path.name,
            )
        )
    return rows


def scaled(cluster: Cluster, factor: float) -> dict:
    """Overrides that scale every pool's replicas and the trainer's devices by `factor`."""
    spec = cluster.spec
    pools = [
        {**p.model_dump(), "replicas": max(1, round(p.replicas * factor))}
        for p in spec.rollout.pools
    ]
    trainer = {"gpusPerWorker": max(1, round(spec.trainer.gpusPerWorker * factor))}
    if not spec.trainer.gpusPerWorker:
        trainer = {}
    return {"spec": {"rollout": {"pools": pools}, "trainer": trainer}}


def sweeps(path: Path, cluster: Cluster, runs: Runs) -> dict:
    sweep = cluster.file.sweep
    if sweep is None:
        return {}
    steps = sweep.steps or min(cluster.steps(), 20)
    base = {"simulate": {"steps": steps, "trajectories": None, "warmupSteps": steps // 3}}
    alphas = {}
    for alpha in sweep.alphas:
        over = deep_merge(
            base,
            {"spec": {"async": {"ratio": alpha}}, "placement": {"oneStepOff": False}},
        )
        if alpha and cluster.file.placement.mode == "colocated":
            continue
        alphas[alpha] = runs.get(path, "main", over, f"alpha {alpha}")
    gpus = {"as written": [], "synchronous (alpha 0)": []}
    for factor in sweep.gpuScales:
        over = deep_merge(base, scaled(cluster, factor))
        written = runs.get(path, "main", over, f"x{factor} devices")
        sync = runs.get(
            path,
            "main",
            deep_merge(over, {"spec": {"async": {"ratio": 0}}, "placement": {"oneStepOff": False}}),
            f"x{factor} devices, alpha 0",
        )
        gpus["as written"].append((sum(written.devices.values()), written.samples_per_s))
        gpus["synchronous (alpha 0)"].append((sum(sync.devices.values()), sync.samples_per_s))
    return {"alphas": alphas, "gpus": gpus}


# --- output ------------------------------------------------------------------------------
def result_table(name: str, r: Result) -> str:
    lines = [
        f"### {name}",
        "",
        "| steps | samples | simulated s | samples/s | step s (median) | trainer idle | "
        "rollout idle | staleness mean / max | dropped stale / cancelled | events | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r.steps} | {r.samples:,} | {r.seconds:,.0f} | {r.samples_per_s:.2f} | {r.step_s:.2f} "
        f"| {r.trainer_idle:.2f} | {r.rollout_idle:.2f} | {r.mean_staleness:.2f} / "
        f"{r.max_staleness} | {r.dropped['stale']:,} / {r.dropped['cancelled']:,} | "
        f"{r.events:,} | {r.wall_s:.1f} |",
        "",
        "| pool | class | replicas | tasks routed | fallen back | completed | tokens decoded |",
        "|---|---|---|---|---|---|---|",
    ]
    for pool, p in r.pools.items():
        lines.append(
            f"| {pool} | {p['class']} | {p['replicas']} | {sum(p['routed'].values()):,} | {p['fallback']:,} | "
            f"{p['completed']:,} | {p['tokens']:,.0f} |"
        )
    lines += ["", "| device class | devices used | mean utilisation |", "|---|---|---|"]
    for cls, (mean, _, _) in r.utilisation.items():
        lines.append(f"| {cls} | {r.devices.get(cls, 0):,} | {mean:.2f} |")
    if r.reward_utilisation:
        lines.append(f"| reward (provisioned) | | {r.reward_utilisation:.2f} |")
    return "\n".join(lines)


def claims_table(rows: list[ClaimRow]) -> str:
    lines = [
        "| claim | file | simulated | paper / measured | error | note | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        figure = (
            " / ".join(f"{p:.2f}x" for p in row.paper)
            if row.kind == "calibration" or len(row.paper) != 2
            else f"{row.paper[0]:.2f}-{row.paper[1]:.2f}x"
        )
        if row.errors:
            note = "vs each run: " + ", ".join(f"{e * 100:.0f} %" for e in row.errors)
        else:
            note = "within 20 %" if row.error <= 0.2 else "outside 20 %"
            note += " (sensitivity, not scored)" if row.kind == "sensitivity" else ""
        lines.append(
            f"| {row.what} (`{row.key}`) | {row.file} | {row.simulated:.2f}x | {figure} | "
            f"{row.error * 100:.0f} % | {note} | {row.source} |"
        )
    return "\n".join(lines)


def plots(out: Path, main: Result, sweep: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 4))
    for cls, (_, times, series) in main.utilisation.items():
        ax.plot([t / 60 for t in times], series, label=cls)
    ax.set(xlabel="simulated minutes", ylabel="busy share of devices", ylim=(0, 1.05))
    ax.set_title("Utilisation per device class")
    ax.legend()
    fig.tight_layout()
    written.append(out / "utilisation.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    if sweep.get("alphas"):
        alphas = sorted(sweep["alphas"])
        base = sweep["alphas"][alphas[0]].samples_per_s
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(alphas, [sweep["alphas"][a].samples_per_s / base for a in alphas], "o-")
        ax.set(xlabel="async ratio α", ylabel=f"samples/s over α = {alphas[0]}")
        ax.set_title("Speedup against α")
        fig.tight_layout()
        written.append(out / "speedup_vs_alpha.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if sweep.get("gpus"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in sweep["gpus"].items():
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        ax.set(xlabel="devices", ylabel="samples/s", xscale="log", yscale="log")
        ax.set_title("Throughput against devices")
        ax.legend()
        fig.tight_layout()
        written.append(out / "throughput_vs_gpus.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def final_line(rows: list[ClaimRow], wall: float) -> str:
    by_key = {row.key: row for row in rows}
    calibration = [row.error for row in rows if row.kind == "calibration"]

    def ratio(key: str) -> str:
        return f"{by_key[key].simulated:.2f}x" if key in by_key else "nan"

    error = f"{max(calibration) * 100:.1f}%" if calibration else "nan"
    return (
        f"simulate calibration_error={error} rollflash rlvr={ratio('rollflash.rlvr')} "
        f"agentic={ratio('rollflash.agentic')} rollarc vs_sync={ratio('rollarc.vs_sync')} "
        f"affinity={ratio('rollarc.affinity')} wall_s={wall:.1f}"
    )


def run_command(file: str, out: str = "simulate-out") -> int:
    started = time.perf_counter()
    path = Path(file)
    cluster = load_cluster(path)
    validate = [path.parent / name for name in cluster.file.validate_]
    for other in validate:  # fail on a bad file before minutes of simulation
        load_cluster(other)
        for name in read_raw(other).get("variants") or {}:
            load_cluster(other, name)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = Runs()
    log(f"simulating {path} ...")
    main = runs.get(path)
    log("sweeps ...")
    sweep = sweeps(path, cluster, runs)
    log("claims ...")
    rows = run_claims(path, runs)
    for other in validate:
        rows += run_claims(other, runs)
    sections = [result_table(f"{path.name} as written", main)]
    if sweep.get("alphas"):
        alphas = sorted(sweep["alphas"])
        base = sweep["alphas"][alphas[0]].samples_per_s
        sections.append(
            "### Speedup against α (shorter runs)\n\n| α | samples/s | vs α = "
            f"{alphas[0]} | trainer idle | staleness max |\n|---|---|---|---|---|\n"
            + "\n".join(
                f"| {a} | {r.samples_per_s:.2f} | {r.samples_per_s / base:.2f}x | "
                f"{r.trainer_idle:.2f} | {r.max_staleness} |"
                for a, r in sorted(sweep["alphas"].items())
            )
        )
    if sweep.get("gpus"):
        sections.append(
            "### Throughput against devices (shorter runs)\n\n| set-up | devices | samples/s |\n"
            "|---|---|---|\n"
            + "\n".join(
                f"| {label} | {n:,} | {rate:.2f} |"
                for label, points in sweep["gpus"].items()
                for n, rate in points
            )
        )
    if rows:
        sections.append("### Claims\n\n" + claims_table(rows))
    written = plots(out_dir, main, sweep)
    print("\n\n".join(sections))
    print("\nplots: " + ", ".join(str(p) for p in written))
    print(
        f"\n{path.name} as written: {main.wall_s:.1f} s wall; the whole command with its "
        f"sweeps and claims: {time.perf_counter() - started:.1f} s"
    )
    print(final_line(rows, main.wall_s))
    return 0
