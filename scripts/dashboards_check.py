"""Every Grafana dashboard panel's query returns data from a real Prometheus (`make dashboards-check`).

1. Prometheus is Debian's `prometheus` package (2.42). Where the binary is missing and this
   runs as root with apt-get, it installs the package (`apt-get install -y
   --no-install-recommends prometheus`); elsewhere it stops and names the package.
2. A short local job runs (`rollfleet run`, 60 steps): a mix of the multi-turn calculator
   task, so the env sandboxes work too, and single-turn countdown, routed by affinity to
   two rollout pools (one prefers prefill work, one decode). Once every service has started, the
   run directory's services.json gives each one's URL.
3. Our own Prometheus, on a free loopback port with its TSDB in a temporary folder, scrapes
   every service's /metrics each second, with the target labels the chart's PodMonitor
   gives in a cluster: namespace, pod, and the pod labels it copies (podTargetLabels)
   app_kubernetes_io_instance (the RLJob's name) and app_kubernetes_io_component.
4. After the run every query of every panel in charts/rollfleet/dashboards/*.json is sent to
   /api/v1/query_range over the run, as Grafana's panels do: template variables match
   everything (their "All" value, `.*`), $__rate_interval is 10s (four scrape intervals
   and more). A query counts as having data when at least one series has a number that is
   not NaN. The variables' label_values() queries must find values too, and, as a check on
   the check, a query for a metric nobody exports must come back empty.

It prints one line per panel (dashboard, title, series per query) and exits 1 naming every
panel without data. Grafana itself is not run: it is not packaged for Debian.

    .venv/bin/python scripts/dashboards_check.py [--steps N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rollfleet.local.nats import die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "charts" / "rollfleet" / "dashboards"
PACKAGE = "prometheus"  # Debian's package and binary
JOB_NAME = "dashboards-check"
NAMESPACE = "local"
JOB_LABEL = "app_kubernetes_io_instance"  # the pod label app.kubernetes.io/instance, on series
SCRAPE_INTERVAL_S = 1
# What Grafana puts in for its global variables (an "All" choice is the variable's allValue).
GLOBALS = {"__rate_interval": "10s", "__interval": "1s", "__interval_ms": "1000"}
NO_DATA_CANARY = "rollfleet_no_such_metric_anywhere"

# --- the dashboards (tests/unit/test_dashboards.py uses these too) ----------------------


def load_dashboards(folder: Path = DASHBOARDS) -> dict[str, dict]:
    """File name without .json -> the dashboard model."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel that shows data (rows are containers; a collapsed row holds its panels)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(dashboard: dict) -> Iterator[tuple[dict, str, str]]:
    """(panel, refId, PromQL) for every query of every panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target.get("refId", "?"), target.get("expr", "")


def variable_queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(name, query) of the dashboard's query variables."""
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            yield var["name"], query.get("query", "") if isinstance(query, dict) else query


def variable_values(dashboard: dict) -> dict[str, str]:
    """What Grafana substitutes for each variable when everything is selected."""
    values = dict(GLOBALS)
    for var in dashboard.get("templating", {}).get("list", []):
        values[var["name"]] = var.get("allValue") or ".*"
    return values


VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def expand(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable substitution ($var, ${var}, ${var:format}, [[var]])."""

    def substitute(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"undefined variable ${name}")
        return values[name]

    return VARIABLE.sub(substitute, expr)


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$", re.S)


def label_values_query(query: str) -> tuple[str, str]:
    """`label_values(selector, label)` -> (selector, label)."""
    match = LABEL_VALUES.match(query)
    if not match:
        raise ValueError(f"not a label_values(metric, label) query: {query!r}")
    return match.group(1), match.group(2)


def series_with_data(result: list[dict]) -> int:
    """Series of a query_range (matrix) or query (vector) result holding a number, not NaN."""

    def number(value) -> bool:
        try:
            return not math.isnan(float(value[1]))
        except (TypeError, ValueError, IndexError):
            return False

    return sum(1 for s in result if any(number(v) for v in s.get("values", [s.get("value")]) if v))


def check(
    dashboards: dict[str, dict],
    query: Callable[[str], list[dict]],
    label_values: Callable[[str, str], list[str]],
) -> tuple[list[str], list[str]]:
    """Evaluate every panel and variable query; (lines to print, failures)."""
    lines, failures = [], []
    for name, dashboard in dashboards.items():
        values = variable_values(dashboard)
        for var, text in variable_queries(dashboard):
            try:
                found = label_values(*label_values_query(expand(text, values)))
                error = "no values"
            except (KeyError, ValueError, RuntimeError) as e:
                found, error = [], str(e)
            status = "ok" if found else "EMPTY"
            lines.append(f"{status:5}  {name:9}  ${var:<42} values={','.join(found) or '-'}")
            if not found:
                failures.append(f"{name}: variable ${var}: {error}")
        by_panel: dict[int, list[str]] = {}
        titles: dict[int, str] = {}
        empty: dict[int, list[str]] = {}
        for panel, ref, expr in panel_queries(dashboard):
            key = id(panel)
            titles[key] = panel.get("title", "?")
            try:
                count = series_with_data(query(expand(expr, values)))
                error = "no data"
            except (KeyError, RuntimeError) as e:
                count, error = 0, str(e)
            by_panel.setdefault(key, []).append(f"{ref}={count}")
            if count == 0:
                empty.setdefault(key, []).append(f"{ref} ({error}): {expr}")
        for panel in panels(dashboard):
            key = id(panel)
            if key not in by_panel:  # a panel without any query shows nothing
                titles[key] = panel.get("title", "?")
                by_panel[key], empty[key] = ["-"], ["no query"]
            status = "EMPTY" if key in empty else "ok"
            lines.append(
                f"{status:5}  {name:9}  {titles[key]:<43} series {' '.join(by_panel[key])}"
            )
            for problem in empty.get(key, []):
                failures.append(f"{name}: panel {titles[key]!r}: {problem}")
    return lines, failures


# --- Prometheus and the local run -------------------------------------------------------------


def ensure_prometheus() -> str:
    """The prometheus binary; installs Debian's package when it is missing and we may."""
    found = shutil.which(PACKAGE)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise SystemExit(
            f"dashboards-check needs Prometheus: install Debian's `{PACKAGE}` package "
            f"(apt-get install {PACKAGE}, as root) or put a `prometheus` binary on PATH"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", PACKAGE]
    for attempt in range(2):
        if attempt:  # a fresh machine may have no package lists yet
            print(f"dashboards-check: running {apt} update", flush=True)
            subprocess.run([apt, "update"], env=env, capture_output=True, text=True)
        print(f"dashboards-check: prometheus not found; running {' '.join(install)}", flush=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        found = shutil.which(PACKAGE)
        if done.returncode == 0 and found:
            return found
    raise SystemExit(
        f"dashboards-check: installing Debian's `{PACKAGE}` package failed:\n"
        f"{(done.stdout + done.stderr)[-2000:]}"
    )


def job_manifest(steps: int) -> dict:
    return {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": JOB_NAME},
        "spec": {
            "seed": 0,
            # calculator samples open env sessions and call the tool; countdown's do not
            "task": {
                "name": "mixed",
                "params": {
                    "tasks": [
                        {"name": "calculator", "params": {"max_turns": 3}},
                        {"name": "countdown"},
                    ]
                },
                "heldoutLimit": 16,
            },
            "model": {"warmup": {"steps": 5, "examples": 64}},
            "env": {"stepLatencyMs": 5, "latencyTail": 0},
            "reward": {"replicas": 2},  # two local processes; the workers spread calls over them
            "rollout": {
                "routing": "affinity",
                "pools": [
                    {"name": "compute", "replicas": 1, "maxBatch": 32, "prefers": "prefill"},
                    {"name": "bandwidth", "replicas": 1, "maxBatch": 32, "prefers": "decode"},
                ],
                "sampling": {"groupSize": 4, "maxNewTokens": 10},
            },
            "trainer": {"steps": steps, "promptsPerStep": 8, "evalSamples": 1},
        },
    }


def scrape_config(services: dict[str, dict]) -> dict:
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "scrape_configs": [
            {
                "job_name": "rollfleet",
                "static_configs": [
                    {
                        "targets": [service["url"].removeprefix("http://")],
                        # what the PodMonitor's relabelling gives in a cluster
                        "labels": {
                            "namespace": NAMESPACE,
                            "pod": name,
                            JOB_LABEL: JOB_NAME,
                            "app_kubernetes_io_component": service["role"],
                        },
                    }
                    for name, service in services.items()
                ],
            }
        ],
    }


class Prometheus:
    def __init__(self, binary: str, workdir: Path, services: dict[str, dict]):
        import yaml

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(services), sort_keys=False))
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # gone with us, however we end
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"prometheus exited:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise SystemExit(f"prometheus not ready within {timeout:.0f}s")

    def api(self, path: str, params: dict | list) -> dict | list:
        import httpx

        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        if body.get("status") != "success":
            raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def stop_run(process: subprocess.Popen) -> None:
    """Ctrl-C for `rollfleet run`: it ends every service it started."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(path: Path, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return "(no log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="RL steps of the local job")
    parser.add_argument("--keep", type=Path, help="keep the run, config and TSDB in this folder")
    parser.add_argument("--timeout", type=float, default=300, help="seconds the run may take")
    args = parser.parse_args(argv)
    started = time.monotonic()
    dashboards = load_dashboards()
    if not dashboards:
        raise SystemExit(f"no dashboards in {DASHBOARDS}")
    binary = ensure_prometheus()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    print(f"dashboards-check: {version.splitlines()[0] if version else binary}", flush=True)

    import yaml

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="rollfleet-dashboards-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / "run"
    manifest = workdir / "job.yaml"
    manifest.write_text(yaml.safe_dump(job_manifest(args.steps), sort_keys=False))
    run_log = workdir / "rollfleet-run.log"
    prometheus = None
    with run_log.open("wb") as log:
        run = subprocess.Popen(
            [
                *(sys.executable, "-m", "rollfleet.cli", "run", str(manifest)),
                *("--run-dir", str(run_dir), "--quiet"),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # its SIGTERM handling stops every service
        )
    try:
        services_file = run_dir / "services.json"
        deadline = time.monotonic() + 120
        while not services_file.exists():
            if run.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the local run did not start its services:\n{tail(run_log)}")
            time.sleep(0.2)
        services = json.loads(services_file.read_text())
        prometheus = Prometheus(binary, workdir, services)
        prometheus.wait_ready()
        window_start = time.time()
        print(
            f"dashboards-check: {len(services)} services of a {args.steps}-step "
            f"{JOB_NAME} run scraped every {SCRAPE_INTERVAL_S}s by {prometheus.url}",
            flush=True,
        )
        try:
            code = run.wait(args.timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(
                f"the local run took longer than {args.timeout:.0f}s:\n{tail(run_log)}"
            ) from None
        if code != 0:
            raise SystemExit(f"the local run failed (exit {code}):\n{tail(run_log)}")
        window_end = time.time()

        def query(expr: str) -> list[dict]:
            params = {"query": expr, "start": window_start, "end": window_end, "step": "1"}
            return prometheus.api("query_range", params)["result"]

        def label_values(selector: str, label: str) -> list[str]:
            params = {"match[]": selector, "start": window_start, "end": window_end}
            return prometheus.api(f"label/{label}/values", params)

        up = prometheus.api(
            "query", {"query": f"max_over_time(up[{int(window_end - window_start) + 1}s])"}
        )["result"]
        never_up = sorted(s["metric"]["pod"] for s in up if s["value"][1] != "1")
        lines, failures = check(dashboards, query, label_values)
        if series_with_data(query(NO_DATA_CANARY)):
            failures.append(f"the check itself: {NO_DATA_CANARY} returned data")
    finally:
        stop_run(run)
        if prometheus is not None:
            prometheus.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"{'':5}  {'dashboard':9}  {'panel / variable':<43} result")
    print("\n".join(lines))
    if never_up:
        print(f"dashboards-check: never scraped successfully: {', '.join(never_up)}")
    took = time.monotonic() - started
    panel_count = sum(1 for d in dashboards.values() for _ in panels(d))
    if failures:
        print(f"dashboards-check: FAILED, {len(failures)} without data ({took:.0f}s):")
        print("\n".join(f"  {f}" for f in failures))
        return 1
    print(
        f"dashboards-check: ok: {panel_count} panels of {len(dashboards)} dashboards "
        f"all have data ({took:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
