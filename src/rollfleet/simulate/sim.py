"""The discrete-event core: one RL job on one cluster, from the first task to the last step.

    from rollfleet.simulate.sim import simulate
    result = simulate(cluster)          # a Result: samples/s, step times, utilisation, ...

Events happen only where something changes: a task is issued or admitted, a replica
finishes a prefill batch or a sequence, an env step or a reward call returns, the trainer
finishes a step or a publish, a replica finishes a weight swap. Decode is never stepped
token by token: between two events a replica's batch is constant, so every sequence in it
advances at one rate. Each replica keeps a virtual token clock V (tokens each of its
sequences has decoded since it joined) and a heap of finish marks; costs.decode_steps_in
turns elapsed seconds into tokens, costs.decode_time the next mark into seconds
(processor sharing, exact for the cost model).

The policies are the runtime's (services/trainer loop.py and services/rollout worker.py):
- the trainer keeps (1+α)·promptsPerStep groups (plus redundantGroups) issued, trains on
  promptsPerStep complete groups at most α versions old (older ones are dropped), issues
  new tasks only between steps, and publishes each version; redundant stragglers are
  cancelled once a later group is trained;
- a worker takes a task only when its slots (maxBatch) and its engine's KV cache have room
  (queue scheduling), holds the slots until the task's last sample is scored and
  published, waits for the task's min_version, and aborts a sample more than α versions
  behind the newest one at each turn start and at its end;
- replicatePrompts splits a group into single-sample tasks; rewardPerSample scores each
  sample as it ends, else a task's samples together; envAsync false makes a task's
  sessions take turns together (TurnGate);
- weights: every replica fetches each new version, then at most swap_slots replicas of a
  pool swap at once (rolling); in-flight samples keep their oldest version;
- routing shared: one queue for all pools; affinity: rollfleet.routing's Router, the
  runtime's, on each pool's queue (a task's profile is what the router's statistics of
  finished episodes converge to);
- placement colocated: rollout and training take turns on the same devices;
  oneStepOff: a whole batch is generated while the previous one trains.
A replica does prefill (and swaps) before decoding (no chunked prefill). On a class with
sharedCores, every active process (replica, trainer) gets min(1, cores / active) of a core.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field

from rollfleet.routing import Router
from rollfleet.simulate import costs
from rollfleet.simulate.workload import Draws, mean_of

QUEUED, DECODE, ENV, DONE, ABORTED = range(5)
OK, STALE, CANCELLED = "ok", "stale", "cancelled"
SWAP, TRAIN = "swap", "train"  # what holds a replica
EPS_TOKENS = 1e-6


class Usage:
    """Busy devices of a class over time, in a fixed number of bins that double in width
    whenever time outgrows them (so nothing needs to know the run's length up front)."""

    __slots__ = ("bins", "busy", "devices", "last", "total", "width")

    def __init__(self, devices: float, bins: int, width: float = 0.25):
        self.devices, self.bins, self.width = devices, [0.0] * bins, width
        self.busy, self.last, self.total = 0.0, 0.0, 0.0

    def change(self, now: float, delta: float) -> None:
        if now > self.last:
            self._add(self.last, now, self.busy)
            self.last = now
        self.busy += delta

    def _add(self, t0: float, t1: float, amount: float) -> None:
        if amount == 0:
            return
        self.total += amount * (t1 - t0)
        bins = self.bins
        while t1 >= self.width * len(bins):
            half = [bins[i] + bins[i + 1] for i in range(0, len(bins), 2)]
            bins[:] = half + [0.0] * (len(bins) - len(half))
            self.width *= 2
        w = self.width
        i0, i1 = int(t0 / w), int(t1 / w)
        if i0 == i1:
            bins[i0] += amount * (t1 - t0)
            return
        bins[i0] += amount * ((i0 + 1) * w - t0)
        for i in range(i0 + 1, i1):
            bins[i] += amount * w
        bins[i1] += amount * (t1 - i1 * w)

    def series(self, end: float) -> tuple[list[float], list[float]]:
        """(bin start times, utilisation 0-1) up to `end`."""
        self.change(end, 0.0)
        n = min(len(self.bins), int(end / self.width) + 1)
        cap = self.width * max(self.devices, 1e-12)
        return [i * self.width for i in range(n)], [self.bins[i] / cap for i in range(n)]


class Device:
    """A class of sharedCores: its users share `cores`, each using at most one."""

    __slots__ = ("active", "cores", "users")

    def __init__(self, cores: int):
        self.cores, self.users, self.active = cores, [], 0

    def rebalance(self, now: float) -> None:
        speed = min(1.0, self.cores / self.active) if self.active else 1.0
        for user in self.users:
            if user.speed != speed:
                user.advance(now)
                user.speed = speed
                user.schedule()


class Group:
    __slots__ = ("batch", "done", "dropped", "index", "oldest", "size", "tasks", "tokens")

    def __init__(self, index: int, size: int, batch: int):
        self.index, self.size, self.batch = index, size, batch
        self.done, self.oldest, self.tokens = 0, math.inf, []
        self.dropped, self.tasks = False, []


class Task:
    __slots__ = (
        "cohort",
        "group",
        "kind",
        "kv",
        "left",
        "min_version",
        "queue",
        "replica",
        "samples",
        "unpublished",
    )

    def __init__(self, group: Group, kind: int, samples: list, min_version: int):
        self.group, self.kind, self.samples, self.min_version = group, kind, samples, min_version
        self.left = self.unpublished = len(samples)
        self.kv = sum(s.kv for s in samples)
        self.replica = self.queue = self.cohort = None


class Sample:
    __slots__ = (
        "ctx",
        "envs",
        "kv",
        "mark",
        "obs",
        "prompt",
        "resp",
        "state",
        "status",
        "task",
        "tokens",
        "turn",
        "version",
    )

    def __init__(self, prompt: int, resp: list, obs: list, envs: list):
        self.prompt, self.resp, self.obs, self.envs = prompt, resp, obs, envs
        self.kv = prompt + sum(resp) + sum(obs)  # peak context: the KV it reserves
        self.tokens = self.kv
        self.turn, self.ctx, self.version = 0, 0, -1
        self.state, self.status, self.mark = QUEUED, OK, 0.0
        self.task = None


class Cohort:
    """Env lockstep (TurnGate): samples start each turn together; ended ones leave."""

    __slots__ = ("active", "arrived", "waiting")

    def __init__(self):
        self.active, self.arrived, self.waiting = 0, {}, {}

    def arrive(self, sample, turn: int) -> list:
        self.arrived[turn] = self.arrived.get(turn, 0) + 1
        self.waiting.setdefault(turn, []).append(sample)
        return self.release()

    def leave(self) -> list:
        self.active -= 1
        return self.release()

    def release(self) -> list:
        out = []
        for turn in [t for t in self.waiting if self.arrived[t] >= self.active]:
            out += self.waiting.pop(turn)
        return out


class Queue:
    __slots__ = ("hungry", "tasks")

    def __init__(self):
        self.tasks, self.hungry = deque(), deque()


@dataclass
class PoolState:
    spec: object
    cls: str
    replicas: list = field(default_factory=list)
    queue: Queue | None = None
    swap_slots: int = 1
    swapping: int = 0
    swap_wait: deque = field(default_factory=deque)
    target: int = 0
    running: int = 0  # tasks its workers run now
    routed: dict = field(default_factory=dict)  # profile -> tasks routed here
    fallback: int = 0
    completed: int = 0


class Replica:
    """One engine replica. Prefill is work the replica owes (`debt`): decoding stops until
    it is paid, so a prefilled sample joins the batch at once and its tokens start when
    the debt is paid; a weight swap or colocated training holds the replica (`hold`).
    Its samples waiting for an env step sleep on the replica (`sleepers`), so a turn
    costs two events: its last token and its env step's return."""

    __slots__ = (
        "S",
        "V",
        "active",
        "b",
        "cohorts",
        "debt",
        "device",
        "fin",
        "hold",
        "hold_left",
        "hungry",
        "in_event",
        "kv_cap",
        "last",
        "peak",
        "pool",
        "rc",
        "res_kv",
        "res_n",
        "reserved_since",
        "reserved_time",
        "sim",
        "sleepers",
        "slots",
        "speed",
        "swap_queued",
        "token",
        "tokens",
        "usage",
        "version",
        "waiting",
    )

    def __init__(self, sim, pool: PoolState, rc, slots: int, usage: Usage, device: Device | None):
        self.sim, self.pool, self.rc, self.usage, self.device = sim, pool, rc, usage, device
        self.slots, self.kv_cap = slots, rc.kv_capacity_tokens
        self.res_n, self.res_kv = 0, 0.0
        self.V, self.S, self.b, self.fin = 0.0, 0.0, 0, []
        self.last, self.speed, self.token = 0.0, 1.0, 0
        self.debt, self.hold, self.hold_left = 0.0, None, 0.0
        self.sleepers, self.in_event = [], False
        self.version, self.waiting, self.swap_queued = 0, [], False
        self.active, self.hungry, self.cohorts, self.tokens = False, False, {}, 0.0
        self.reserved_since, self.reserved_time, self.peak = 0.0, 0.0, 0
        if device is not None:
            device.users.append(self)

    # --- the clock ---------------------------------------------------------------------
    def advance(self, now: float) -> None:
        dt = now - self.last
        if dt <= 0:
            return
        self.last = now
        dt *= self.speed
        if self.hold is not None:
            self.hold_left -= dt
            return
        if self.debt:
            if dt <= self.debt:
                self.debt -= dt
                return
            dt -= self.debt
            self.debt = 0.0
        b = self.b
        if b:
            dv = costs.decode_steps_in(self.rc, b, self.S, dt)
            self.V += dv
            self.S += b * dv
            self.tokens += b * dv

    def schedule(self) -> None:
        if self.in_event:
            return  # on_event schedules once, at its end
        self.token += 1
        sim = self.sim
        if self.hold is not None:
            when = sim.now + (self.hold_left if self.hold_left > 0 else 0.0) / self.speed
        elif self.b:
            dv = self.fin[0][0] - self.V
            work = self.debt + (costs.decode_time(self.rc, self.b, self.S, dv) if dv > 0 else 0.0)
            when = sim.now + work / self.speed
        elif self.debt:  # prefill of samples since stopped: the replica goes idle after
            when = sim.now + self.debt / self.speed
        else:
            when = math.inf
        if self.sleepers and self.sleepers[0][0] < when:
            when = self.sleepers[0][0]
        if when == math.inf:
            return
        sim.seq += 1
        heapq.heappush(sim.heap, (when, sim.seq, self.on_event, self.token))

    def refresh(self) -> None:
        """After a change: busy accounting, the shared device's speeds, the next event."""
        active = self.hold is not None or self.b > 0 or self.debt > 0
        if active != self.active:
            self.active = active
            self.usage.change(self.sim.now, self.rc.devices if active else -self.rc.devices)
            if self.device is not None:
                self.device.active += 1 if active else -1
                self.device.rebalance(self.sim.now)
        self.schedule()

    def on_event(self, token: int) -> None:
        if token != self.token:
            return  # superseded
        sim = self.sim
        self.in_event = True
        self.advance(sim.now)
        if self.hold is not None and self.hold_left <= 1e-9:
            hold, self.hold = self.hold, None
            if hold == SWAP:
                self.finish_swap()
        if self.debt < 1e-12:
            self.debt = 0.0
        fin = self.fin
        while fin and fin[0][0] <= self.V + EPS_TOKENS:
            s = heapq.heappop(fin)[2]
            self.b -= 1
            self.S -= s.ctx
            sim.turn_done(s)
        sleepers = self.sleepers
        while sleepers and sleepers[0][0] <= sim.now:
            sim.env_done(heapq.heappop(sleepers)[2])
        if not self.b and not fin:
            self.V = self.S = 0.0  # no drift from a clock that never resets
        self.in_event = False
        self.refresh()

    def sleep(self, s, seconds: float) -> None:
        """A sample waits `seconds` for its env step (called inside on_event)."""
        sim = self.sim
        sim.seq += 1
        heapq.heappush(self.sleepers, (sim.now + seconds, sim.seq, s))

    # --- prefill and decode -----------------------------------------------------------
    def add_prefill(self, s, work: float) -> None:
        if self.in_event:  # on_event advanced the clock and refreshes at its end
            self.debt += work
            self.join(s)
            return
        self.advance(self.sim.now)
        self.debt += work
        self.join(s)
        self.refresh()

    def join(self, s) -> None:
        """A sample starts its turn: its new tokens into the cache, then decoding."""
        new = s.prompt if s.turn == 0 else s.obs[s.turn - 1]
        if s.turn == 0:
            s.version = self.version
        resp = s.resp[s.turn]
        self.S += s.ctx + new
        s.ctx += new + resp
        s.state = DECODE
        s.mark = self.V + resp
        self.b += 1
        if self.b > self.peak:
            self.peak = self.b
        sim = self.sim
        sim.seq += 1
        heapq.heappush(self.fin, (s.mark, sim.seq, s))

    def remove(self, s) -> None:
        """Abort a decoding sample: it leaves the batch at once."""
        self.advance(self.sim.now)
        self.fin = [e for e in self.fin if e[2] is not s]
        heapq.heapify(self.fin)
        self.b -= 1
        self.S -= s.ctx - (s.mark - self.V)
        self.refresh()

    def hold_for(self, kind: str, work: float) -> None:
        self.advance(self.sim.now)
        self.hold, self.hold_left = kind, work
        self.refresh()

    # --- weights -----------------------------------------------------------------------
    def finish_swap(self) -> None:
        pool, sim = self.pool, self.sim
        self.version = max(self.version, pool.target)
        pool.swapping -= 1
        self.swap_queued = False
        if sim.reprefill and self.b:
            # partialRollout reprefill: recompute every in-flight sequence's KV cache.
            pairs = self.S * (self.S / self.b) / 2
            self.debt += self.S * self.rc.prefill_per_token_s + pairs * self.rc.attention_per_pair_s
        if self.version < pool.target:
            sim.queue_swap(self)
        sim.grant_swaps(pool)
        ready = [t for t in self.waiting if t.min_version <= self.version]
        if ready:
            self.waiting = [t for t in self.waiting if t.min_version > self.version]
            for task in ready:
                sim.start_task(task)

    # --- admission -------------------------------------------------------------------
    def fits(self, task) -> bool:
        return (
            self.res_n + len(task.samples) <= self.slots
            and self.res_kv + task.kv <= self.kv_cap + 1e-9
        )

    def reserve(self, n: int, kv: float) -> None:
        if self.res_n == 0 and n > 0:
            self.reserved_since = self.sim.now
        self.res_n += n
        self.res_kv += kv
        if self.res_n == 0 and n < 0:
            self.reserved_time += self.sim.now - self.reserved_since


class Trainer:
    """The trainer's devices: a step's training, then the publish of its version."""

    __slots__ = (
        "busy",
        "busy_since",
        "busy_time",
        "device",
        "devices",
        "inflight",
        "last",
        "phase",
        "ready",
        "sim",
        "speed",
        "token",
        "usage",
        "work_left",
    )

    def __init__(self, sim, usage: Usage | None, devices: int, device: Device | None):
        self.sim, self.usage, self.devices, self.device = sim, usage, devices, device
        self.inflight: dict[int, Group] = {}
        self.ready: deque = deque()
        self.busy, self.phase, self.work_left = False, None, 0.0
        self.last, self.speed, self.token = 0.0, 1.0, 0
        self.busy_time = self.busy_since = 0.0
        if device is not None:
            device.users.append(self)

    def advance(self, now: float) -> None:
        dt = now - self.last
        if dt > 0:
            self.last = now
            if self.busy:
                self.work_left -= dt * self.speed

    def schedule(self) -> None:
        self.token += 1
        if self.busy:
            self.sim.at(
                self.sim.now + max(self.work_left, 0) / self.speed, self.on_event, self.token
            )

    def set_busy(self, busy: bool) -> None:
        now = self.sim.now
        if busy == self.busy:
            return
        self.advance(now)
        self.busy = busy
        if busy:
            self.busy_since = now
        else:
            self.busy_time += now - self.busy_since
        if self.usage is not None:
            self.usage.change(now, self.devices if busy else -self.devices)
        if self.device is not None:
            self.device.active += 1 if busy else -1
            self.device.rebalance(now)

    def start(self, phase: str, work: float) -> None:
        self.phase, self.work_left = phase, work
        self.set_busy(True)
        self.schedule()

    def on_event(self, token: int) -> None:
        if token != self.token:
            return
        self.advance(self.sim.now)
        if self.phase == "train":
            self.sim.trained()
        else:
            self.set_busy(False)
            self.sim.published()


class RewardService:
    """The reward: `up` replicas serving `slots` calls each; serverless scales `up` to
    ceil(calls / targetConcurrency) between 0 and maxScale, with cold starts and a stable
    window before scaling down (Knative)."""

    def __init__(self, sim, cluster):
        spec, cfg = cluster.spec.reward, cluster.file.reward
        self.sim, self.cfg = sim, cfg
        self.serverless = cfg.mode == "serverless"
        self.target = spec.targetConcurrency
        self.slots = cfg.slotsPerReplica or spec.targetConcurrency
        self.max = spec.maxScale if self.serverless else spec.replicas
        self.up = 0 if self.serverless else spec.replicas
        self.starting, self.busy, self.queue = 0, 0, deque()
        self.low_since = None
        self.gpus = max(spec.gpus, 1)
        self.provisioned = Usage(self.max * self.gpus, cluster.file.simulate.utilisationBins)
        self.provisioned.change(0.0, self.up * self.gpus)
        self.used = Usage(self.max * self.gpus, cluster.file.simulate.utilisationBins)

    def call(self, seconds: float, samples: list) -> None:
        self.queue.append((seconds, samples))
        self._serve()
        self._scale()

    def _serve(self) -> None:
        sim = self.sim
        while self.queue and self.busy < self.up * self.slots:
            seconds, samples = self.queue.popleft()
            self.busy += 1
            self.used.change(sim.now, self.gpus / self.slots)
            sim.at(sim.now + seconds, self._done, samples)

    def _done(self, samples: list) -> None:
        self.busy -= 1
        self.used.change(self.sim.now, -self.gpus / self.slots)
        self.sim.publish(samples)
        self._serve()
        self._scale()

    def _scale(self) -> None:
        if not self.serverless:
            return
        now = self.sim.now
        want = min(self.max, math.ceil((self.busy + len(self.queue)) / self.target))
        if want > self.up + self.starting:
            for _ in range(want - self.up - self.starting):
                self.starting += 1
                self.sim.at(now + self.cfg.coldStartS, self._started, None)
        if want < self.up:
            if self.low_since is None:
                self.low_since = now
                self.sim.at(now + self.cfg.scaleDownAfterS, self._maybe_down, now)
        else:
            self.low_since = None

    def _started(self, _) -> None:
        self.starting -= 1
        self.up += 1
        self.provisioned.change(self.sim.now, self.gpus)
        self._serve()

    def _maybe_down(self, since: float) -> None:
        if self.low_since != since:
            return
        self.low_since = None
        want = math.ceil((self.busy + len(self.queue)) / self.target)
        if want < self.up:
            self.provisioned.change(self.sim.now, (want - self.up) * self.gpus)
            self.up = want
        self._scale()


@dataclass
class Result:
    """What one simulated run measured."""

    name: str
    steps: int
    samples: int
    seconds: float
    samples_per_s: float
    step_s: float
    trainer_idle: float
    rollout_idle: float
    max_staleness: int
    mean_staleness: float
    dropped: dict
    pools: dict
    utilisation: dict  # class -> (mean, times, series)
    reward_utilisation: float
    devices: dict  # class -> devices the job uses there
    wall_s: float
    events: int


class Sim:
    """One run of a cluster file (`seed` overrides simulate.seed; `trace` keeps each step's
    sample lengths and versions); run() returns its Result."""

    def __init__(self, cluster, seed: int | None = None, trace: bool = False):
        self.c, spec, f = cluster, cluster.spec, cluster.file
        self.now, self.heap, self.seq, self.events = 0.0, [], 0, 0
        self.alpha = spec.async_.ratio
        self.N, self.G = spec.trainer.promptsPerStep, spec.rollout.sampling.groupSize
        self.redundant = spec.async_.redundantGroups
        self.per_sample_reward = spec.async_.rewardPerSample
        self.replicate = spec.async_.replicatePrompts
        self.lockstep = None if spec.async_.envAsync else f.workload.lockstep
        self.reprefill = spec.async_.partialRollout == "reprefill"
        self.colocated = f.placement.mode == "colocated"
        self.one_step_off = f.placement.oneStepOff
        self.prefix_cache = f.workload.prefixCache
        self.router = Router(spec) if spec.rollout.routing == "affinity" else None
        self.pad = f.workload.padToLongest
        self.host = f.hostCosts
        self.window, self.window_open, self.unseen = f.hostCosts.collectWindowS, False, []
        self.target_steps = cluster.steps()
        self.warmup = min(f.simulate.warmupSteps, self.target_steps - 1)
        self.draws = Draws(cluster, f.simulate.seed if seed is None else seed)
        self.trace = [] if trace else None
        bins = f.simulate.utilisationBins
        self.devices = {
            name: Device(cls.count) for name, cls in f.classes.items() if cls.sharedCores
        }
        self.usage: dict[str, Usage] = {}
        self.used: dict[str, int] = {}

        def usage(cls: str, n: int) -> Usage:
            self.used[cls] = self.used.get(cls, 0) + n
            if cls not in self.usage:
                self.usage[cls] = Usage(0, bins)
            self.usage[cls].devices += n
            return self.usage[cls]

        self.pools: list[PoolState] = []
        shared = Queue()
        for pool in spec.rollout.pools:
            cls = cluster.pool_class(pool)
            rc = costs.replica_costs(cluster, pool)
            ps = PoolState(pool, cls, swap_slots=spec.weights.swap_slots(pool.replicas))
            ps.queue = shared if spec.rollout.routing == "shared" else Queue()
            u = usage(cls, pool.replicas * rc.devices)
            for _ in range(pool.replicas):
                r = Replica(self, ps, rc, pool.maxBatch, u, self.devices.get(cls))
                ps.replicas.append(r)
                r.hungry = True
                ps.queue.hungry.append(r)
            self.pools.append(ps)
        self.replicas = [r for p in self.pools for r in p.replicas]
        tcls = cluster.trainer_class()
        tusage = None if self.colocated else usage(tcls, cluster.trainer_devices())
        self.trainer = Trainer(
            self,
            tusage,
            cluster.trainer_devices(),
            None if self.colocated else self.devices.get(tcls),
        )
        self.reward = RewardService(self, cluster)
        if f.reward.gpuClass is not None:
            self.used[f.reward.gpuClass] = self.used.get(f.reward.gpuClass, 0) + (
                self.reward.max * self.reward.gpus
            )
        self.version, self.step, self.next_index, self.batches_issued = 0, 0, 0, 0
        self.checked_version = 0
        self.samples_trained = 0
        self.warm_time, self.warm_samples = 0.0, 0
        self.staleness: list[int] = []
        self.dropped = {STALE: 0, CANCELLED: 0}
        self.step_ends: list[float] = []
        self.done = False
        self.profiles = self._profiles()

    # --- the loop ----------------------------------------------------------------------
    def at(self, when: float, fn, arg) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, fn, arg))

    def run(self) -> Result:
        started = time.perf_counter()
        self.issue()
        if self.window:
            self.poll()
        heap, pop, events = self.heap, heapq.heappop, 0
        while heap and not self.done:
            when, _, fn, arg = pop(heap)
            self.now = when
            fn(arg)
            events += 1
        self.events = events
        if not self.done:
            raise RuntimeError(
                f"simulation stalled at step {self.step} of {self.target_steps} (t={self.now:.1f}s):"
                " no event left; the tasks may not fit any replica (maxBatch, KV cache)"
            )
        return self._result(time.perf_counter() - started)

    # --- issuing and routing -------------------------------------------------------------
    def _profiles(self) -> list[str]:
        """Each task type's profile, as the router's statistics of finished episodes
        converge to: prefill-heavy above prefillRatio prefilled tokens per generated one."""
        wl, ratio = self.c.file.workload, self.c.spec.rollout.prefillRatio
        out = []
        for t in wl.tasks:
            turns = max(1.0, mean_of(t.turns))
            prompt, resp, obs = (
                mean_of(t.promptTokens),
                mean_of(t.responseTokens),
                mean_of(t.obsTokens),
            )
            prefilled = prompt + (turns - 1) * obs  # what rollfleet.routing.token_profile counts
            out.append("prefill" if prefilled / max(turns * resp, 1e-9) > ratio else "decode")
        return out

    def issue(self) -> None:
        """Keep (1+α)·N groups (plus the redundant ones) in flight; one-step-off issues a
        whole batch once the previous batch's rollout is done."""
        t = self.trainer
        limit = (1 + self.alpha) * self.N + self.redundant
        if self.one_step_off:
            if t.inflight or len(t.inflight) + len(t.ready) + self.N > limit:
                return
            min_version = max(0, self.batches_issued - 1)
            for _ in range(self.N):
                self._new_group(min_version)
            self.batches_issued += 1
            return
        while len(t.inflight) + len(t.ready) < limit:
            self._new_group(self.version)

    def _new_group(self, min_version: int) -> None:
        d, G = self.draws, self.G
        kind = d.task_type()
        s_prompt, s_turns, s_resp, s_obs, s_env, _ = d.streams[kind]
        g = Group(self.next_index, G, self.next_index // self.N)
        self.next_index += 1
        self.trainer.inflight[g.index] = g
        prompt = s_prompt.next()
        turns = s_turns.take(G)
        total = sum(turns)
        resp = s_resp.take(total)
        if total == G:  # single-turn samples
            samples = [Sample(prompt, [n], (), ()) for n in resp]
        else:
            obs, envs = s_obs.take(total - G), s_env.take(total - G)
            samples, i, j = [], 0, 0
            for n in turns:
                samples.append(
                    Sample(prompt, resp[i : i + n], obs[j : j + n - 1], envs[j : j + n - 1])
                )
                i, j = i + n, j + n - 1
        parts = [[s] for s in samples] if self.replicate else [samples]
        for part in parts:
            task = Task(g, kind, part, min_version)
            for s in part:
                s.task = task
            g.tasks.append(task)
            self.route(task)

    def route(self, task: Task) -> None:
        """Affinity: the runtime's own router (rollfleet.routing) on the pools' queues.
        Shared: every pool pulls from one queue."""
        pools = self.pools
        if self.router is not None:
            profile = self.profiles[task.kind]
            choice = self.router.route(
                profile,
                {p.spec.name: len(p.queue.tasks) for p in pools},
                {p.spec.name: p.running for p in pools},
            )
            pool = next(p for p in pools if p.spec.name == choice.pool)
            pool.fallback += choice.fallback
            pool.routed[profile] = pool.routed.get(profile, 0) + 1
        else:
            pool = pools[0]
        task.queue = pool.queue
        pool.queue.tasks.append(task)
        self.dispatch(pool.queue)

    def dispatch(self, q: Queue) -> None:
        """Hand queued tasks to replicas with room, round robin."""
        tasks, hungry = q.tasks, q.hungry
        while tasks and hungry:
            task = tasks[0]
            if task.group.dropped:
                tasks.popleft()
                self._skip(task)
                continue
            r = hungry.popleft()
            r.hungry = False
            if r.fits(task):
                tasks.popleft()
                self.admit(r, task)
                if r.res_n < r.slots:
                    r.hungry = True
                    hungry.append(r)

    def pull(self, r: Replica) -> None:
        """A replica with freed room takes queued tasks (queue scheduling)."""
        q = r.pool.queue
        while q.tasks:
            task = q.tasks[0]
            if task.group.dropped:
                q.tasks.popleft()
                self._skip(task)
            elif r.fits(task):
                q.tasks.popleft()
                self.admit(r, task)
            else:
                break
        if not r.hungry and r.res_n < r.slots:
            r.hungry = True
            q.hungry.append(r)

    def _skip(self, task: Task) -> None:
        """A task of a cancelled group, acked without running."""
        for s in task.samples:
            s.state, s.status = ABORTED, CANCELLED

    def admit(self, r: Replica, task: Task) -> None:
        task.replica = r
        r.pool.running += 1
        r.reserve(len(task.samples), task.kv)
        if self.lockstep == "group":
            task.cohort = Cohort()
        elif self.lockstep == "batch":
            task.cohort = r.cohorts.setdefault(task.group.batch, Cohort())
        if task.cohort is not None:
            task.cohort.active += len(task.samples)
        if r.version >= task.min_version:
            self.start_task(task)
        else:
            r.waiting.append(task)

    def start_task(self, task: Task) -> None:
        r, first = task.replica, True
        for s in task.samples:
            if s.state != QUEUED:
                continue
            # The group's samples share the prompt's prefill (n samples of one request).
            work = self.host.perSampleS
            if first:
                work += costs.prefill_time(r.rc, s.prompt, 0)
                first = False
            r.add_prefill(s, work)

    # --- a sample's turns ------------------------------------------------------------------
    def turn_done(self, s: Sample) -> None:
        s.turn += 1
        if s.turn < len(s.resp):
            s.state = ENV
            s.task.replica.sleep(s, s.envs[s.turn - 1])
        else:
            self.sample_end(s)

    def env_done(self, s: Sample) -> None:
        if s.state != ENV:
            return
        cohort = s.task.cohort
        if cohort is None:
            self.begin_turn(s)
        else:
            s.state = QUEUED  # waiting at the gate
            for x in cohort.arrive(s, s.turn):
                self.begin_turn(x)

    def begin_turn(self, s: Sample) -> None:
        if s.state == ABORTED:
            return
        if self.version - s.version > self.alpha:  # the worker's per-turn check
            self.abort(s, STALE)
            return
        r = s.task.replica
        new = s.obs[s.turn - 1]
        if self.prefix_cache:
            work = costs.prefill_time(r.rc, new, s.ctx)
        else:
            work = costs.prefill_time(r.rc, s.ctx + new, 0)
        r.add_prefill(s, work + self.host.perEnvStepS)

    def sample_end(self, s: Sample) -> None:
        if self.version - s.version > self.alpha:  # the worker's check at the episode's end
            s.status = STALE
        s.state = DONE
        self._leave(s)
        if self.per_sample_reward:
            s.task.left -= 1
            self._score([s])
        else:
            self._one_less(s.task)

    def _one_less(self, task: Task) -> None:
        """A sample of the task ended or stopped; the last one has the task scored."""
        task.left -= 1
        if task.left == 0 and not self.per_sample_reward:
            done = [x for x in task.samples if x.state == DONE]
            if done:
                self._score(done)

    def _leave(self, s: Sample) -> None:
        task = s.task
        task.replica.res_kv -= s.kv
        if task.cohort is not None:
            for x in task.cohort.leave():
                self.begin_turn(x)

    def _score(self, samples: list) -> None:
        scored = [s for s in samples if s.status == OK]
        if not scored:
            self.publish(samples)
            return
        latency = self.draws.streams[samples[0].task.kind][5].next()
        if latency <= 0 and not self.reward.serverless:
            self.publish(samples)
        else:
            self.reward.call(latency, samples)

    def abort(self, s: Sample, status: str) -> None:
        """Stop a sample (stale at a turn start, or its group cancelled)."""
        if s.state in (DONE, ABORTED):
            return
        task = s.task
        if s.state == DECODE:
            task.replica.remove(s)
        s.state, s.status = ABORTED, status
        if task.replica is None:  # still queued: nothing reserved yet
            return
        self._leave(s)
        self.publish([s])
        self._one_less(task)

    def publish(self, samples: list) -> None:
        if self.window:
            self.unseen += samples
        else:
            for s in samples:
                self.collect(s)
        task = samples[0].task
        task.unpublished -= len(samples)
        if task.unpublished == 0 and task.replica is not None:
            r = task.replica
            r.reserve(-len(task.samples), 0.0)
            r.pool.completed += 1
            r.pool.running -= 1
            self.pull(r)

    # --- the trainer -------------------------------------------------------------------
    def poll(self) -> None:
        """The local trainer's fetch (bus.fetch with a timeout): what is already published
        comes back at once; if nothing is, the fetch lingers for the whole window."""
        if self.trainer.busy or self.window_open or self.done:
            return
        if self.unseen:
            self.deliver(None)
        else:
            self.window_open = True
            self.at(self.now + self.window, self.deliver, True)

    def deliver(self, window_end) -> None:
        if window_end:
            self.window_open = False
        seen, self.unseen = self.unseen, []
        for s in seen:
            self.collect(s)
        self.try_step()
        self.poll()

    def collect(self, s: Sample) -> None:
        t, g = self.trainer, s.task.group
        if g.dropped:
            return
        if s.status != OK:
            self.drop(g, s.status)
            return
        g.done += 1
        g.oldest = min(g.oldest, s.version)
        g.tokens.append(s.tokens)
        if g.done == g.size:
            del t.inflight[g.index]
            if self.version - g.oldest <= self.alpha:
                t.ready.append(g)
            else:
                self.dropped[STALE] += g.size
                g.dropped = True
            self.try_step()

    def drop(self, g: Group, reason: str) -> None:
        g.dropped = True
        self.trainer.inflight.pop(g.index, None)
        self.dropped[reason] += g.size
        if not self.trainer.busy:
            self.issue()

    def try_step(self) -> None:
        t = self.trainer
        if t.busy or self.done:
            return
        if self.checked_version != self.version:  # ready groups age only when it moves
            self.checked_version = self.version
            for g in [g for g in t.ready if self.version - g.oldest > self.alpha]:
                t.ready.remove(g)
                self.dropped[STALE] += g.size
        if len(t.ready) < self.N:
            self.issue()
            return
        batch = [t.ready.popleft() for _ in range(self.N)]
        if self.redundant:
            newest = max(g.index for g in batch)
            for g in [g for g in t.inflight.values() if g.index < newest]:
                self.cancel(g)
        tokens = [n for g in batch for n in g.tokens]
        trained = len(tokens) * max(tokens) if self.pad else sum(tokens)
        for g in batch:
            self.staleness.append(self.version - g.oldest)
        if self.trace is not None:
            self.trace.append(
                {
                    "step": self.step,
                    "start": self.now,
                    "versions": [g.oldest for g in batch],
                    "lengths": [s.resp for g in batch for task in g.tasks for s in task.samples],
                }
            )
        self.samples_trained += len(tokens)
        work = costs.train_time(self.c, trained) + self.host.trainerPerSampleS * len(tokens)
        if self.colocated:
            work += self.c.file.placement.colocateSwitchS
            for r in self.replicas:
                r.hold_for(TRAIN, work)
        t.start("train", work)

    def cancel(self, g: Group) -> None:
        """Redundant rollouts: a straggler group is dropped and its samples stopped."""
        g.dropped = True
        self.trainer.inflight.pop(g.index, None)
        self.dropped[CANCELLED] += g.size
        for task in g.tasks:
            for s in task.samples:
                self.abort(s, CANCELLED)

    def trained(self) -> None:
        if self.colocated:  # the weights are already where rollout runs
            self.trainer.set_busy(False)
            self.version += 1
            for r in self.replicas:
                r.version = self.version
            self.published(announce=False)
            return
        self.trainer.start("publish", costs.publish_time(self.c))

    def published(self, announce: bool = True) -> None:
        if announce:
            self.version += 1
            fetch = costs.fetch_time(self.c, len(self.replicas))
            for pool in self.pools:
                self.at(self.now + fetch, self.fetched, (pool, self.version))
        self.step += 1
        self.step_ends.append(self.now)
        if self.step == self.warmup:
            self.warm_time, self.warm_samples = self.now, self.samples_trained
        if self.step >= self.target_steps:
            self.done = True
            return
        if self.colocated:
            for r in self.replicas:
                ready = [t for t in r.waiting if t.min_version <= r.version]
                r.waiting = [t for t in r.waiting if t.min_version > r.version]
                for task in ready:
                    self.start_task(task)
        self.issue()
        self.try_step()
        if self.window:
            self.poll()

    def fetched(self, arg) -> None:
        pool, version = arg
        pool.target = max(pool.target, version)
        for r in pool.replicas:
            if r.version < pool.target:
                self.queue_swap(r)
        self.grant_swaps(pool)

    def queue_swap(self, r: Replica) -> None:
        if not r.swap_queued:
            r.swap_queued = True
            r.pool.swap_wait.append(r)

    def grant_swaps(self, pool: PoolState) -> None:
        while pool.swap_wait and pool.swapping < pool.swap_slots:
            pool.swapping += 1
            pool.swap_wait.popleft().hold_for(SWAP, pool.replicas[0].rc.swap_s)

    # --- results -------------------------------------------------------------------------
    def _result(self, wall: float) -> Result:
        end = self.now
        for r in self.replicas:
            r.advance(end)
            if r.res_n:
                r.reserved_time += end - r.reserved_since
        span = end - self.warm_time
        samples = self.samples_trained - self.warm_samples
        t = self.trainer
        if t.busy:
            t.busy_time += end - t.busy_since
        utilisation = {}
        for cls, u in self.usage.items():
            times, series = u.series(end)
            utilisation[cls] = (u.total / max(u.devices * end, 1e-12), times, series)
        rew = self.reward
        rew.provisioned.change(end, 0)
        rew.used.change(end, 0)
        steps = [b - a for a, b in zip(self.step_ends, self.step_ends[1:], strict=False)]
        return Result(
            name=self.c.variant,
            steps=self.step,
            samples=self.samples_trained,
            seconds=end,
            samples_per_s=samples / span if span > 0 else 0.0,
            step_s=sorted(steps)[len(steps) // 2] if steps else end,
            trainer_idle=1 - t.busy_time / end if end else 0.0,
            rollout_idle=1
            - sum(r.reserved_time for r in self.replicas) / (len(self.replicas) * end),
            max_staleness=max(self.staleness, default=0),
            mean_staleness=sum(self.staleness) / max(len(self.staleness), 1),
            dropped=dict(self.dropped),
            pools={
                p.spec.name: {
                    "class": p.cls,
                    "replicas": len(p.replicas),
                    "routed": p.routed,
                    "peak_batch": max(r.peak for r in p.replicas),
                    "fallback": p.fallback,
                    "completed": p.completed,
                    "tokens": sum(r.tokens for r in p.replicas),
                }
                for p in self.pools
            },
            utilisation=utilisation,
            reward_utilisation=rew.used.total / rew.provisioned.total
            if rew.provisioned.total
            else 0.0,
            devices=dict(self.used),
            wall_s=wall,
            events=self.events,
        )


def simulate(cluster, seed: int | None = None, trace: bool = False) -> Result:
    return Sim(cluster, seed, trace).run()
