"""Seeded chaos on a local swarm of real processes: servers are killed, frozen, told to leave or joined by new
ones while a client generates, and every generated token must still equal a fault-free reference.

A bootstrap peer and 4 servers of a tiny 6-layer Llama with overlapping spans ([0, 3), [3, 6), [0, 4), [2, 6):
every block on at least 2 servers) and one client that generates greedily, a few prompts per schedule. A schedule
is drawn from `random.Random(seed)`: one or two faults, each at a random step of a random generation:

- kill:  SIGKILL the server's process group (it and its DHT daemons die at once), restart it in the background
         (a new peer id), overlapping the generation;
- pause: SIGSTOP the group (a hung machine with its sockets open), SIGCONT after a drawn number of seconds;
- term:  SIGTERM (the server announces it leaves and exits), restart it once it has exited;
- add:   start one more server on a drawn span (it leaves again at the end of the schedule).

A fault hits a server of the session's chain (drawn by position), or before the first step any of the 4. Two
faults of one schedule hit different servers, and every fault is undone (restart, resume) in seconds, so every
block keeps a live server or gets one back well within the client's `missing_blocks_timeout_s`. After the last
generation the schedule quiesces: paused servers resume, dead ones are restarted, added ones leave, and all 4
must answer. Checks: the tokens of every generation equal transformers' greedy output for the same prompt; no
server process exited unless the schedule killed or stopped it, and one told to leave exited cleanly; after
quiescing, every server's free KV cache is back to its full budget (no session leaked).

    python tests/chaos.py --seed 7                      # replay one schedule (fresh swarm), verbose
    python tests/chaos.py --schedules 200 [--first-seed 0] [--record] [--deadline 07:50]

`tests/test_chaos.py` runs a few seeds under pytest with one swarm for all of them.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.local import LocalSwarm, ManagedProcess
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.wire import Message

NUM_LAYERS = 6
SPANS = [(0, 3), (3, 6), (0, 4), (2, 6)]
PROMPTS = [[1, 17, 42, 99, 5, 23], [1, 8, 9], [1, 30, 31, 32, 33, 34, 35, 36, 37, 12]]
NEW_TOKENS = (24, 32)  # each generation draws its length from this range
KINDS = ("kill", "pause", "term", "add")
WEIGHTS = (4, 3, 3, 1)
PAUSE_S = (0.5, 6.0)  # a paused server resumes after this many seconds (below the step deadline: a hiccup)
CACHE_BUDGET = 16384  # servers' --max-cache-tokens (the default)
RESTART_TIMEOUT_S = 120.0  # a server start on a loaded 2-core machine: a few seconds, with a wide margin
QUIESCE_TIMEOUT_S = 60.0  # for all servers to answer and free their caches after a schedule
LEAVE_TIMEOUT_S = 30.0  # for a server told to leave (SIGTERM) to exit


@dataclass
class Action:
    """One fault: drawn from the seed (generation, step, kind, pick, pause_s, span), resolved when applied."""

    generation: int  # index into the schedule's generations
    step: int  # applied after this many generated tokens (0: before the first step, when no chain exists yet)
    kind: str
    pick: float  # which server: this fraction into the session's chain (or into the 4 servers, before step 1)
    pause_s: float = 0.0
    span: tuple[int, int] | None = None  # of a server to add
    server: int | None = None  # resolved: index in LocalSwarm.servers
    peer_id: str | None = None
    in_chain: bool = False  # the server was a hop of the session when the fault hit

    def planned(self) -> str:
        what = {"pause": f" {self.pause_s:.1f}s", "add": f" {self.span}"}.get(self.kind, "")
        return f"g{self.generation}@{self.step} {self.kind}{what} pick={self.pick:.2f}"

    def applied(self) -> str:
        if self.kind == "add":
            return f"g{self.generation}@{self.step} add {self.span[0]}:{self.span[1]}"
        where = "hop" if self.in_chain else "before" if self.step == 0 else "idle"
        what = f" {self.pause_s:.1f}s" if self.kind == "pause" else ""
        return f"g{self.generation}@{self.step} {self.kind}{what} s{self.server}({where})"


@dataclass
class Schedule:
    seed: int
    prompts: list[int]  # indices into PROMPTS, one generation each
    new_tokens: list[int]
    actions: list[Action]


def plan(seed: int) -> Schedule:
    """The schedule of a seed: the same seed gives the same generations and faults."""
    rng = random.Random(seed)
    prompts = rng.sample(range(len(PROMPTS)), len(PROMPTS))
    new_tokens = [rng.randint(*NEW_TOKENS) for _ in prompts]
    actions = []
    for _ in range(rng.choice((1, 1, 2))):
        generation = rng.randrange(len(prompts))
        step = rng.randrange(new_tokens[generation])  # the step after it still runs
        kind = rng.choices(KINDS, WEIGHTS)[0]
        action = Action(generation, step, kind, pick=rng.random())
        if kind == "pause":
            action.pause_s = round(rng.uniform(*PAUSE_S), 1)
        if kind == "add":
            start = rng.randrange(NUM_LAYERS)
            action.span = (start, rng.randint(start + 1, NUM_LAYERS))
        actions.append(action)
    actions.sort(key=lambda a: (a.generation, a.step))
    return Schedule(seed, prompts, new_tokens, actions)


@dataclass
class Result:
    seed: int
    actions: list[Action]
    failovers: list = field(default_factory=list)  # the client's Failover records of this schedule
    recovery_s: float | None = None  # longest wait for a token after the first fault of a generation
    generations_ok: int = 0
    generations: int = 0
    token_diffs: int = 0
    new_tokens: int = 0  # generated tokens checked against the reference
    problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    quiesce_s: float = 0.0  # of wall_s: waiting for restarts, resuming, until every server is healthy
    client_log: list[str] = field(default_factory=list)
    server_logs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def actions_text(self) -> str:
        return "; ".join(
            a.applied() if a.server is not None or a.kind == "add" else a.planned() for a in self.actions
        )

    def row(self) -> list[object]:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}"
        tokens = f"{self.generations_ok}/{self.generations}" + ("" if self.ok else " FAIL")
        return [self.seed, self.actions_text(), len(self.failovers), recovery, tokens, f"{self.wall_s:.1f}"]

    def report(self) -> str:
        """Everything needed to replay and diagnose a failed schedule."""
        lines = [
            f"chaos schedule seed={self.seed} FAILED (replay: python tests/chaos.py --seed {self.seed})",
            f"actions: {self.actions_text()}",
            *(f"problem: {p}" for p in self.problems),
            *(f"failover: {describe_failover(f)}" for f in self.failovers),
        ]
        if self.client_log:
            lines += ["client log:", *(f"  {line}" for line in self.client_log[-60:])]
        for name, log in self.server_logs.items():
            lines += [f"{name} log (last lines):", *(f"  {line.rstrip()}" for line in log[-30:])]
        return "\n".join(lines)


def describe_failover(record) -> str:
    names = ("peer_id", "start", "end", "reason", "route_s", "replay_s", "replayed_tokens")
    values = {n: getattr(record, n, None) for n in names}
    peer = str(values["peer_id"])[-8:]
    route = values["route_s"] or 0.0
    replay = values["replay_s"] or 0.0
    return (
        f"{peer} [{values['start']}, {values['end']}) {values['reason']}: route {route:.3f} s, "
        f"replay {replay:.3f} s ({values['replayed_tokens']} tokens)"
    )


class _FaultStreamer(BaseStreamer):
    """Calls `on_step(k)` after the k-th generated token (k = 0 before the first step) and times each token."""

    def __init__(self, on_step: Callable[[int], None]):
        self.on_step = on_step
        self.count = -1
        self.times: list[float] = []

    def put(self, value) -> None:
        self.count += 1
        self.times.append(time.monotonic())
        self.on_step(self.count)

    def end(self) -> None:
        pass


class _LogBuffer(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Chaos:
    """The swarm, the client and the references, shared by all schedules of a run."""

    def __init__(
        self,
        path: Path,
        *,
        step_timeout_s: float = 2.0,
        missing_blocks_timeout_s: float = 60.0,
        echo: Callable[[str], None] = print,
        log_level: int = logging.INFO,
    ):
        self.path = path
        self.step_timeout_s = step_timeout_s
        self.missing_blocks_timeout_s = missing_blocks_timeout_s
        self.echo = echo
        self.log_level = log_level  # of the client's `swarmllm` loggers during a schedule
        self.swarm = LocalSwarm()
        self.model = None
        self.reference = None
        self._references: dict[tuple[int, int], list[int]] = {}
        self.peer_ids: list[str] = []  # per index of swarm.servers
        self._signalled: set[int] = set()  # ids of ManagedProcess objects we killed or stopped on purpose
        self._seen: list[ManagedProcess] = []  # every server process of the run, replaced ones included
        self._lock = threading.Lock()
        self._add_lock = threading.Lock()  # one server added at a time, so its index is known

    def start(self) -> None:
        self.swarm.start_bootstrap()
        records = self.swarm.add_servers([(str(self.path), span) for span in SPANS])
        self.peer_ids = [r["peer_id"] for r in records]
        self._seen = list(self.swarm.servers)
        self.model = AutoDistributedModelForCausalLM.from_pretrained(
            str(self.path),
            initial_peers=self.swarm.initial_peers,
            step_timeout_s=self.step_timeout_s,
            missing_blocks_timeout_s=self.missing_blocks_timeout_s,
        )
        self.reference = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()

    def close(self) -> None:
        if self.model is not None:
            self.model.shutdown()
        self.swarm.close()

    def __enter__(self) -> Chaos:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def expected(self, prompt: int, new_tokens: int) -> list[int]:
        key = (prompt, new_tokens)
        if key not in self._references:
            ids = torch.tensor([PROMPTS[prompt]])
            with torch.no_grad():
                out = self.reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            self._references[key] = out[0].tolist()
        return self._references[key]

    # --- one schedule ---------------------------------------------------------------------------------------

    def run_schedule(self, seed: int) -> Result:
        schedule = plan(seed)
        result = Result(seed, schedule.actions, generations=len(schedule.prompts))
        began = time.monotonic()
        self.model.swarm.failovers.clear()
        log = _LogBuffer()
        logging.getLogger("swarmllm").addHandler(log)
        previous_level = logging.getLogger("swarmllm").level
        logging.getLogger("swarmllm").setLevel(self.log_level)
        state = _ScheduleState()
        try:
            for g, (prompt, new_tokens) in enumerate(zip(schedule.prompts, schedule.new_tokens)):
                todo = [a for a in schedule.actions if a.generation == g]
                self._generate(g, prompt, new_tokens, todo, state, result)
        finally:
            quiesce_began = time.monotonic()
            self._quiesce(state, result)
            result.quiesce_s = time.monotonic() - quiesce_began
            logging.getLogger("swarmllm").removeHandler(log)
            logging.getLogger("swarmllm").setLevel(previous_level)
        result.failovers = list(self.model.swarm.failovers)
        result.wall_s = time.monotonic() - began
        if not result.ok:
            result.client_log = log.lines
            for a in schedule.actions:
                if a.server is not None and a.server < len(self.swarm.servers):
                    result.server_logs.setdefault(f"server {a.server}", self.swarm.servers[a.server].log)
            for name, lines in state.dead_logs.items():
                result.server_logs[name] = lines
        return result

    def _generate(
        self, g: int, prompt: int, new_tokens: int, todo: list[Action], state: _ScheduleState, result: Result
    ) -> None:
        ids = torch.tensor([PROMPTS[prompt]])
        want = self.expected(prompt, new_tokens)
        first_fault_at: list[float] = []
        active = []

        def on_step(k: int) -> None:
            for action in todo:
                if action.step == k:
                    first_fault_at.append(time.monotonic())
                    self._apply(action, active[0].session, state)

        streamer = _FaultStreamer(on_step)
        got = None
        try:
            with self.model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
                active.append(session)
                out = self.model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=streamer)
                got = out[0].tolist()
        except Exception as e:  # noqa: BLE001 - any error is a failed schedule, reported with its seed
            result.problems.append(
                f"generation {g} (prompt {prompt}, {new_tokens} tokens) raised after {max(streamer.count, 0)} "
                f"tokens: {type(e).__name__}: {e}\n{traceback.format_exc()}"
            )
        if first_fault_at:
            after = [t for t in streamer.times if t >= first_fault_at[0]]
            gaps = [b - a for a, b in zip([first_fault_at[0], *after], after)]
            if gaps:
                result.recovery_s = max(result.recovery_s or 0.0, max(gaps))
        if got is None:
            return
        diffs = sum(a != b for a, b in zip(got, want)) + abs(len(got) - len(want))
        result.token_diffs += diffs
        result.new_tokens += len(got) - len(PROMPTS[prompt])
        if diffs:
            result.problems.append(
                f"generation {g} (prompt {prompt}, {new_tokens} tokens): {diffs} tokens differ\n"
                f"  got  {got}\n  want {want}"
            )
        else:
            result.generations_ok += 1

    def _apply(self, action: Action, session, state: _ScheduleState) -> None:
        """Inject one fault (called inside generate, between two steps; returns at once)."""
        if action.kind == "add":
            state.spawn(self._add_server, action)
            return
        hops = [h.peer_id for h in getattr(session, "hops", [])]
        with self._lock:
            index = {p: i for i, p in enumerate(self.peer_ids)}
            chain = [index[p] for p in hops if p in index]
            candidates = chain or list(range(len(SPANS)))
            first = candidates[min(int(action.pick * len(candidates)), len(candidates) - 1)]
            order = [first, *candidates, *range(len(self.peer_ids))]
            target = next(i for i in order if i not in state.busy)
            server = self.swarm.servers[target]
            action.server, action.peer_id = target, self.peer_ids[target]
            action.in_chain = target in chain
            state.busy.add(target)
        self.echo(f"  [seed fault] {action.applied()} peer {action.peer_id[-8:]}")
        if action.kind == "kill":
            self._signalled.add(id(server))
            server.kill()
            state.spawn(self._restart, target)
        elif action.kind == "term":
            self._signalled.add(id(server))
            server.terminate()
            state.spawn(self._leave_and_restart, target, server)
        elif action.kind == "pause":
            server.pause()
            timer = threading.Timer(action.pause_s, server.resume)
            timer.daemon = True
            timer.start()
            state.paused.append((server, timer))
        else:
            raise ValueError(f"unknown fault {action.kind!r}")

    def _restart(self, index: int) -> None:
        record = self.swarm.restart_server(index, timeout_s=RESTART_TIMEOUT_S)
        with self._lock:
            self.peer_ids[index] = record["peer_id"]
            self._seen.append(self.swarm.servers[index])

    def _leave_and_restart(self, index: int, server: ManagedProcess) -> None:
        problem = None
        try:
            code = server.proc.wait(LEAVE_TIMEOUT_S)
            if code != 0:
                problem = f"server {index} exited with {code} after SIGTERM (expected a clean leave)"
        except subprocess.TimeoutExpired:
            problem = f"server {index} did not exit within {LEAVE_TIMEOUT_S} s of SIGTERM"
        self._restart(index)  # kills what is left of the old process group first
        if problem:
            raise RuntimeError(problem)

    def _add_server(self, action: Action) -> None:
        with self._add_lock:
            index = len(self.swarm.servers)
            try:
                record = self.swarm.add_server(str(self.path), action.span, timeout_s=RESTART_TIMEOUT_S)
            finally:
                with self._lock:
                    self._seen.append(self.swarm.servers[index])
            with self._lock:
                self.peer_ids.append(record["peer_id"])
                action.server, action.peer_id = index, record["peer_id"]

    # --- back to 4 healthy servers ----------------------------------------------------------------------------

    def _quiesce(self, state: _ScheduleState, result: Result) -> None:
        deadline = time.monotonic() + RESTART_TIMEOUT_S + LEAVE_TIMEOUT_S
        for thread in state.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                result.problems.append(f"{thread.name} did not finish in time")
        result.problems += state.errors
        for server, timer in state.paused:
            timer.cancel()
            server.resume()
        # servers added by the schedule leave again (a graceful leave, not a crash)
        while len(self.swarm.servers) > len(SPANS):
            server = self.swarm.servers.pop()
            self.swarm.server_args.pop()
            with self._lock:
                del self.peer_ids[len(self.swarm.servers) :]
            self._signalled.add(id(server))
            if server.stop(LEAVE_TIMEOUT_S) != 0:
                result.problems.append(
                    f"an added server did not leave cleanly: exit {server.proc.returncode}"
                )
        with self._lock:
            seen = list(self._seen)
        for server in seen:
            code = server.proc.poll()
            if code is not None and id(server) not in self._signalled:
                result.problems.append(f"{server.name} (pid {server.proc.pid}) exited by itself with {code}")
                state.dead_logs[f"{server.name} pid {server.proc.pid}"] = list(server.log)
                self._signalled.add(id(server))  # reported once
        if self.swarm.bootstrap.proc.poll() is not None:
            result.problems.append(f"the bootstrap peer exited with {self.swarm.bootstrap.proc.returncode}")
        for i in range(len(SPANS)):
            if self.swarm.servers[i].proc.poll() is not None:
                try:
                    self._restart(i)
                except Exception as e:  # noqa: BLE001 - reported; the next schedule tries again
                    result.problems.append(f"restarting server {i} failed: {e}")
        problem = self._wait_healthy()
        if problem:
            result.problems.append(problem)

    def _wait_healthy(self) -> str | None:
        """Poll (with a deadline) until every server answers `info` with its whole cache budget free."""
        deadline = time.monotonic() + QUIESCE_TIMEOUT_S
        last: dict[str, object] = {}
        while True:
            run_sync(self.model.swarm.servers(refresh=True))  # the servers' direct addresses, when known
            for i, peer_id in enumerate(self.peer_ids):
                try:
                    conn = run_sync(self.model.swarm.connection(peer_id), timeout=10)
                    reply = run_sync(conn.call("info", Message(), timeout=5), timeout=10)
                    last[f"s{i}"] = int(reply.meta["cache_tokens_left"])
                except Exception as e:  # noqa: BLE001 - not answering yet; polled again until the deadline
                    last[f"s{i}"] = f"{type(e).__name__}: {e}"
            if all(v == CACHE_BUDGET for v in last.values()):
                return None
            if time.monotonic() > deadline:
                return f"after quiescing, servers not healthy with a free cache of {CACHE_BUDGET}: {last}"
            time.sleep(0.5)  # polling interval of a condition with a deadline


@dataclass
class _ScheduleState:
    busy: set[int] = field(default_factory=set)  # servers faulted in this schedule
    threads: list[threading.Thread] = field(default_factory=list)
    paused: list[tuple[ManagedProcess, threading.Timer]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dead_logs: dict[str, list[str]] = field(default_factory=dict)

    def spawn(self, fn: Callable, *args) -> None:
        """Run fn(*args) in the background (a restart overlaps the generation); errors are kept."""

        def run() -> None:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - reported at the end of the schedule
                self.errors.append(f"{fn.__name__}{args}: {type(e).__name__}: {e}")

        thread = threading.Thread(target=run, name=f"{fn.__name__}{args}", daemon=True)
        thread.start()
        self.threads.append(thread)


# --- CLI -------------------------------------------------------------------------------------------------------


def summary(results: list[Result], wall_s: float, stopped_early: str | None) -> tuple[list[str], list[list]]:
    failed = [r for r in results if not r.ok]
    recoveries = sorted(r.recovery_s for r in results if r.failovers and r.recovery_s is not None)
    kinds = {k: sum(a.kind == k for r in results for a in r.actions) for k in KINDS}

    def pct(q: float) -> str:
        if not recoveries:
            return "-"
        return f"{recoveries[min(len(recoveries) - 1, int(q * len(recoveries)))]:.2f}"

    header = [
        "schedules",
        "failed (seeds)",
        "faults (kill/pause/term/add)",
        "failovers",
        "recovery s median",
        "recovery s p90",
        "recovery s max",
        "generations checked",
        "tokens checked",
        "token diffs",
        "wall s",
    ]
    row = [
        f"{len(results)}" + (f" ({stopped_early})" if stopped_early else ""),
        f"{len(failed)}" + (f" ({', '.join(str(r.seed) for r in failed)})" if failed else ""),
        "/".join(str(kinds[k]) for k in KINDS),
        sum(len(r.failovers) for r in results),
        f"{statistics.median(recoveries):.2f}" if recoveries else "-",
        pct(0.9),
        f"{recoveries[-1]:.2f}" if recoveries else "-",
        sum(r.generations for r in results),
        sum(r.new_tokens for r in results),
        sum(r.token_diffs for r in results),
        f"{wall_s:.0f}",
    ]
    return header, [row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, help="run (replay) only this schedule, with the client's logs")
    parser.add_argument("--schedules", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--step-timeout", type=float, default=2.0, help="client step_timeout_s (hang floor)")
    parser.add_argument("--record", action="store_true", help="append a summary to benchmarks/RESULTS.md")
    parser.add_argument("--debug", action="store_true", help="the client's debug logs (with --seed)")
    parser.add_argument("--deadline", help="HH:MM UTC: start no schedule after it (the summary says so)")
    parser.add_argument("--checkpoint", help="a 6-layer llama checkpoint (default: a tiny one built here)")
    args = parser.parse_args(argv)

    seeds = [args.seed] if args.seed is not None else range(args.first_seed, args.first_seed + args.schedules)
    if args.seed is not None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop_at = None
    if args.deadline:
        hh, mm = (int(x) for x in args.deadline.split(":"))
        now = time.gmtime()
        stop_at = time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    planned = [plan(s) for s in seeds]
    print(f"{len(planned)} schedules, seeds {seeds[0]}..{seeds[-1]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        path = (
            Path(args.checkpoint)
            if args.checkpoint
            else make_tiny_checkpoint(Path(tmp) / "llama", "llama", num_layers=NUM_LAYERS)
        )
        results: list[Result] = []
        stopped_early = None
        began = time.monotonic()
        header = ["seed", "actions", "failovers", "recovery s", "tokens ok", "wall s"]
        level = logging.DEBUG if args.debug else logging.INFO
        with Chaos(path, step_timeout_s=args.step_timeout, log_level=level) as chaos:
            print(f"swarm up in {time.monotonic() - began:.1f} s", flush=True)
            try:
                for schedule in planned:
                    if stop_at is not None and time.time() > stop_at:
                        stopped_early = f"stopped at the {args.deadline} UTC deadline"
                        break
                    print(
                        f"seed {schedule.seed}: {'; '.join(a.planned() for a in schedule.actions)}",
                        flush=True,
                    )
                    result = chaos.run_schedule(schedule.seed)
                    results.append(result)
                    row = " | ".join(str(c) for c in result.row())
                    print(f"  {row} (quiesce {result.quiesce_s:.1f} s)", flush=True)
                    if not result.ok:
                        print(result.report(), flush=True)
            except KeyboardInterrupt:
                stopped_early = "interrupted"
        wall_s = time.monotonic() - began

    print()
    print(_table(header, [r.row() for r in results]))
    sum_header, sum_rows = summary(results, wall_s, stopped_early)
    print()
    print(_table(sum_header, sum_rows))
    for r in results:
        if not r.ok:
            print(f"FAILED seed {r.seed}: {r.actions_text()} (replay: python tests/chaos.py --seed {r.seed})")
    if args.record and results:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from common import append_results, markdown_table

        notes = (
            f"Seeds {results[0].seed}..{results[-1].seed}. Each schedule: {len(PROMPTS)} greedy generations of "
            f"{NEW_TOKENS[0]}-{NEW_TOKENS[1]} tokens through 4 server processes (spans {SPANS}, tiny 6-layer "
            f"llama, 1 thread each) and 1 or 2 seeded faults (weights kill/pause/term/add {WEIGHTS}), then "
            f"quiesce. Client step_timeout_s={args.step_timeout}. Recovery: the longest wait for a token after "
            "a generation's first fault, over the schedules with a failover. Every generation is checked token for "
            "token against transformers' greedy output."
        )
        append_results(
            "Chaos soak: seeded server faults during generation", markdown_table(sum_header, sum_rows), notes
        )
        print("recorded to benchmarks/RESULTS.md")
    return 0 if all(r.ok for r in results) else 1


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


if __name__ == "__main__":
    sys.exit(main())
