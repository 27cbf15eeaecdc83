"""How long each part of a rebalancing event takes with the default server and client settings.

A fresh local swarm per repeat: 4 server processes started without a span (memory for 2 blocks each) over a tiny
6-layer Llama, and a client with default options. Once they cover the model, the only server of some blocks
leaves, in one of these ways (all but hang-idle by default):

  kill-during  SIGKILL during a generation (at its 6th token)
  kill-idle    SIGKILL while no generation runs, then a generation starts at once
  term-during  SIGTERM (it announces offline and hands its sessions back) during a generation
  hang-idle    SIGSTOP while idle, then a generation: a host gone without closing its connections (power cut,
               network partition), which only a balance check's ping notices (a SIGKILL breaks the connections
               that other servers hold to it from their network measurement, pings or pushes, if they hold one)

From the other servers' logs (timestamps to the ms): the leave -> the first of them noticing ("connections to ...
broke", or "... does not answer" when a balance check pings it), and the one that moves noticing -> it deciding to
move ("moving from blocks") -> its blocks loaded and announced online ("moved to blocks ...: loaded in X s, online
Y s later"; a repair may take more than one move). From DHT look-ups polled from the leave on: every block has an
online server again (not counting the one that left: a dead server's records stay until they expire). From the
client: the generation's seconds, its failovers' `route_s` and `replay_s`, and whether its tokens are
transformers' greedy ones. `--logs DIR` keeps every repeat's server logs.

Each leave comes once every server has had its first balance check (whose pings leave it a connection to each
other), or with `--fresh` as soon as the servers cover the model (as tests/test_balancing.py does): then the server
that must move may hold no connection to the one that leaves, and notice it only at its periodic check.

    python benchmarks/rebalance_event.py [--repeats 3] [--scenarios kill-during kill-idle term-during hang-idle]
        [--fresh] [--logs DIR] [--no-record]

About 6-9 minutes with the defaults on 2 cores (each repeat starts 5 processes and waits 17 s to settle).
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import subprocess
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch
from common import PROMPT, append_results, checkpoint, markdown_table
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

import swarmllm
from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.balancing.memory import MIN_HEADROOM_BYTES
from swarmllm.client.loop import run_sync
from swarmllm.dht import ServerState, find_servers
from swarmllm.local import LocalSwarm
from swarmllm.models import load_config
from swarmllm.server.memory import block_bytes, cache_bytes_per_block

SERVERS = 4
CACHE_TOKENS = 256
NEW_TOKENS = 100  # ~1 s fault-free: a SIGTERM at the 6th token must still find the session open
FAULT_AT_TOKEN = 6
CLIENT_WAIT_S = 60.0  # the client's default missing_blocks_timeout_s
SPREAD_TIMEOUT_S = 90.0  # servers started together cover the model (a collision waits for a balance check)
COVER_TIMEOUT_S = 120.0  # from the leave to every block online again: past the client's wait, to see the gap
MOVE_LOG_TIMEOUT_S = 15.0  # a move's last log line comes after its old sessions close (up to 5 s)
POLL_S = 0.25
# a settled swarm: every server has had its first balance check, whose pings leave it a connection to each other
SETTLE_S = 17.0

SCENARIOS = {
    "kill-during": f"SIGKILL at the {FAULT_AT_TOKEN}th token of a generation",
    "kill-idle": "SIGKILL while idle, then a generation at once",
    "term-during": f"SIGTERM at the {FAULT_AT_TOKEN}th token of a generation",
    "hang-idle": "SIGSTOP while idle (a host gone without closing its connections), then a generation at once",
}

DEFAULT_SCENARIOS = ["kill-during", "kill-idle", "term-during"]  # hang-idle adds ~1 min a repeat

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
MOVING = re.compile(r"moving from blocks \[(\d+), (\d+)\) to \[(\d+), (\d+)\)")
MOVED = re.compile(r"moved to blocks \[(\d+), (\d+)\): loaded in ([\d.]+) s, online ([\d.]+) s later")


class _AtToken(BaseStreamer):
    """Calls `action()` once, after `step` generated tokens; notes when the first generated token came."""

    def __init__(self, step: int | None, action=None):
        self.step, self.action, self.count = step, action, -1
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.count += 1  # the first put is the prompt
        if self.count == 1:
            self.first_token_at = time.monotonic()
        if self.count == self.step:
            self.action()

    def end(self) -> None:
        pass


class _Lines(logging.Handler):
    """Keeps the client's log lines of one repeat (written out with `--logs`)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + "\n")


def server_memory(path: Path) -> int:
    """--max-memory for 2 blocks and their KV cache, as tests/test_balancing.py sizes it."""
    _, config = load_config(str(path))
    per_block = block_bytes(config, torch.float32) + cache_bytes_per_block(
        config, torch.float32, CACHE_TOKENS
    )
    return MIN_HEADROOM_BYTES + int(2.5 * per_block)


def coverage(model, num_blocks: int, exclude: str | None = None) -> list[int]:
    """Online servers per block as the DHT says, leaving out `exclude` (a dead server's records outlive it)."""
    servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, num_blocks), timeout=30)
    counts = [0] * num_blocks
    for s in servers:
        if s.state == ServerState.ONLINE and s.peer_id != exclude:
            for b in range(s.start_block, s.end_block):
                counts[b] += 1
    return counts


def log_events(lines: list[str], since: float) -> list[tuple[float, str]]:
    """(wall-clock time, line) of the timestamped log lines at or after `since` (asctime has ms)."""
    out = []
    for line in list(lines):
        m = STAMP.match(line)
        if m:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since - 0.001:
                out.append((at, line.strip()))
    return out


class CoverageWatch(threading.Thread):
    """Polls the DHT from the leave on until every block has an online server other than the one that left."""

    def __init__(self, model, num_blocks: int, victim: str):
        super().__init__(daemon=True)
        self.model, self.num_blocks, self.victim = model, num_blocks, victim
        self.covered_at: float | None = None  # monotonic
        self.error: str | None = None
        self.began = time.monotonic()

    def run(self) -> None:
        while time.monotonic() - self.began < COVER_TIMEOUT_S:
            try:
                if min(coverage(self.model, self.num_blocks, self.victim)) >= 1:
                    self.covered_at = time.monotonic()
                    return
            except Exception as e:  # noqa: BLE001 - a failed look-up is retried until the deadline
                self.error = f"{type(e).__name__}: {e}"
            time.sleep(POLL_S)


def run_repeat(
    scenario: str,
    path: Path,
    memory: int,
    want: list[list[int]],
    *,
    fresh: bool = False,
    logs: Path | None = None,
) -> dict:
    """One event in a fresh swarm. Never raises: a repeat that did not produce the event says why."""
    result: dict = {"scenario": scenario, "ok": False, "reason": ""}
    num_blocks = load_config(str(path))[1].num_layers
    extra = ["--max-memory", str(memory), "--max-cache-tokens", str(CACHE_TOKENS)]
    swarm = LocalSwarm()
    model = None
    client_log, client_logger = _Lines(), logging.getLogger("swarmllm.client")
    client_logger.addHandler(client_log)
    client_logger.setLevel(logging.INFO)
    try:
        swarm.start_bootstrap()
        infos = swarm.add_servers([(str(path), None)] * SERVERS, extra=extra)
        online_at = time.monotonic()
        peer_ids = [i["peer_id"] for i in infos]
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        began = time.monotonic()
        while min(coverage(model, num_blocks)) < 1:
            if time.monotonic() - began > SPREAD_TIMEOUT_S:
                result["reason"] = f"the servers did not cover all blocks in {SPREAD_TIMEOUT_S:.0f} s"
                return result
            time.sleep(POLL_S)
        result["spread_s"] = time.monotonic() - began
        if not fresh:
            time.sleep(max(0.0, SETTLE_S - (time.monotonic() - online_at)))
        prompt = torch.tensor(PROMPT)
        began = time.monotonic()
        clean = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        result["clean_s"] = time.monotonic() - began
        result["clean_equal"] = clean.tolist() == want

        left: dict = {}

        def leave() -> None:
            servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, num_blocks), timeout=30)
            counts = coverage(model, num_blocks)
            sole = [
                s
                for s in servers
                if s.state == ServerState.ONLINE
                and s.peer_id in peer_ids
                and min(counts[b] for b in range(s.start_block, s.end_block)) == 1
            ]
            if not sole:
                left["error"] = f"no server is the only one of a block (online per block: {counts})"
                return
            victim = sole[0]
            index = peer_ids.index(victim.peer_id)
            left.update(peer_id=victim.peer_id, index=index, blocks=(victim.start_block, victim.end_block))
            left["wall"], left["mono"] = time.time(), time.monotonic()
            if scenario.startswith("kill"):
                swarm.servers[index].kill()
            elif scenario.startswith("term"):
                swarm.servers[index].terminate()
            else:
                swarm.servers[index].pause()
            left["watch"] = CoverageWatch(model, num_blocks, victim.peer_id)
            left["watch"].start()

        failovers_before = len(model.swarm.failovers)
        if scenario.endswith("idle"):
            leave()
            streamer = _AtToken(None)
        else:
            streamer = _AtToken(FAULT_AT_TOKEN, leave)
        if "error" in left:
            result["reason"] = left["error"]
            return result
        began = time.monotonic()
        try:
            got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
            result["equal"] = got.tolist() == want
        except Exception as e:  # noqa: BLE001 - e.g. the client's wait ran out: the servers' side still counts
            result["equal"] = False
            result["gen_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        result["gen_s"] = time.monotonic() - began
        result["first_s"] = streamer.first_token_at - began if streamer.first_token_at else None
        if "error" in left:
            result["reason"] = left["error"]
            return result
        if "mono" not in left:
            result["reason"] = "the generation ended before the fault"
            return result
        failovers = model.swarm.failovers[failovers_before:]
        result["failovers"] = len(failovers)
        result["route_s"] = sum(f.route_s for f in failovers) if failovers else None
        result["replay_s"] = sum(f.replay_s for f in failovers) if failovers else None
        result["victim_blocks"] = left["blocks"]

        watch: CoverageWatch = left["watch"]
        watch.join(COVER_TIMEOUT_S)
        if watch.covered_at is not None:
            result["covered_s"] = watch.covered_at - left["mono"]
        covered_wall = None if watch.covered_at is None else left["wall"] + result["covered_s"]
        result.update(server_timeline(swarm, left["index"], left["peer_id"], left["wall"], covered_wall))
        if watch.covered_at is None:
            result["reason"] = f"blocks not all online again {COVER_TIMEOUT_S:.0f} s after the leave" + (
                f" (last look-up error: {watch.error})" if watch.error else ""
            )
            return result
        if result.get("decide_s") is None:
            result["reason"] = "covered again without a logged move"
            return result
        result["ok"] = result["equal"]
        if "gen_error" in result:
            result["reason"] = f"the generation failed after {result['gen_s']:.1f} s: {result['gen_error']}"
        elif not result["equal"]:
            result["reason"] = "the generation's tokens differ from transformers' greedy ones"
        return result
    except Exception as e:  # noqa: BLE001 - reported in the table's notes, not dropped
        result["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        traceback.print_exc()
        return result
    finally:
        if model is not None:
            model.shutdown()
        for server in swarm.servers:  # SIGKILL: a fresh swarm follows, nobody needs a clean leave
            server.kill()
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            stem = f"{scenario}-{time.strftime('%H%M%S')}"
            for i, server in enumerate(swarm.servers):
                (logs / f"{stem}-server{i}.log").write_text("".join(server.log))
            (logs / f"{stem}-client.log").write_text("".join(client_log.lines))
        client_logger.removeHandler(client_log)
        if swarm.bootstrap is not None:
            swarm.bootstrap.kill()


def server_timeline(
    swarm: LocalSwarm, victim: int, victim_id: str, left_at: float, covered_at: float | None
) -> dict:
    """The other servers' log lines after the leave (wall-clock times): who noticed first and how, and the moves
    decided until every block was online again (all of them if it never was), each with its load and announce."""
    others = [i for i in range(len(swarm.servers)) if i != victim]

    def events() -> list[tuple[float, int, str]]:
        return sorted((at, i, line) for i in others for at, line in log_events(swarm.servers[i].log, left_at))

    out: dict = {"decide_s": None}
    notices = [
        (at, i, "broken connection" if "broke; checking" in line else "failed ping in a balance check")
        for at, i, line in events()
        if victim_id in line
        and ("broke; checking the swarm now" in line or "does not answer; balancing without it" in line)
    ]
    if notices:
        out["notice_s"] = notices[0][0] - left_at
        out["trigger"] = notices[0][2]
    out["noticed"] = {}  # server index -> (seconds after the leave, how) of its first notice
    for at, i, kind in notices:
        out["noticed"].setdefault(i, (round(at - left_at, 2), kind))
    until = float("inf") if covered_at is None else covered_at
    decided = [(at, i, m) for at, i, line in events() if (m := MOVING.search(line)) and at <= until]
    moves = []
    for decided_at, mover, m in decided:
        move = {
            "server": mover,
            "decide_s": decided_at - left_at,
            "what": f"[{m[1]}, {m[2]}) -> [{m[3]}, {m[4]})",
        }
        deadline = time.monotonic() + MOVE_LOG_TIMEOUT_S  # its line comes once its old sessions closed
        while time.monotonic() < deadline:
            done = [
                d for at, i, line in events() if i == mover and at >= decided_at and (d := MOVED.search(line))
            ]
            if done:
                move.update(load_s=float(done[0][3]), online_s=float(done[0][4]))
                move["announced_s"] = move["decide_s"] + move["load_s"] + move["online_s"]
                break
            time.sleep(POLL_S)
        moves.append(move)
    out["moves"] = moves
    if moves:
        first = moves[0]
        out.update(decide_s=first["decide_s"], load_s=first.get("load_s"), online_s=first.get("online_s"))
        if (
            first["server"] in out["noticed"]
        ):  # else it saw the leave in the DHT only (a SIGTERM's offline record)
            out["mover_notice_s"] = out["noticed"][first["server"]][0]
        announced = [m["announced_s"] for m in moves if "announced_s" in m]
        out["announced_s"] = max(announced) if len(announced) == len(moves) else None
    return out


def source_state() -> str:
    """Which swarmllm code ran, if not this checkout's as committed."""
    src = Path(swarmllm.__file__).resolve().parent
    repo = Path(__file__).resolve().parent.parent
    if not src.is_relative_to(repo):
        return f"swarmllm imported from {src}, not from this checkout."
    status = subprocess.run(
        ["git", "status", "--porcelain", "--", str(src)], cwd=repo, capture_output=True, text=True
    )
    changed = [line[3:] for line in status.stdout.splitlines()]
    return f"Uncommitted changes to swarmllm: {', '.join(changed)}." if changed else ""


PARTS = [
    ("notice_s", "leave -> another server notices it"),
    ("mover_notice_s", "leave -> the server that moves notices it"),
    ("decide_s", "leave -> it decides to move"),
    ("load_s", "that move: joining announce + loading"),
    ("online_s", "that move: loaded -> announced online"),
    ("announced_s", "leave -> the last move's blocks announced online"),
    ("covered_s", "leave -> every block online in the DHT"),
    ("gen_s", "generation across the event"),
    ("first_s", "generation: start -> first new token"),
    ("clean_s", "the same generation, fault-free"),
    ("route_s", "client failover: route_s"),
    ("replay_s", "client failover: replay_s"),
]


CLIENT_PARTS = {"gen_s", "first_s", "clean_s", "route_s", "replay_s"}


def summarize(results: dict[str, list[dict]]) -> tuple[list[str], list[list[object]]]:
    header = ["part (seconds)"]
    for scenario in results:
        header += [f"{scenario} median", f"{scenario} max"]
    rows: list[list[object]] = []
    for key, label in PARTS:
        row: list[object] = [label]
        for runs in results.values():
            # the servers' side counts whatever the client saw; the client's only where it got the right tokens
            values = [r[key] for r in runs if (r["ok"] or key not in CLIENT_PARTS) and r.get(key) is not None]
            row += [f"{statistics.median(values):.2f}", f"{max(values):.2f}"] if values else ["-", "-"]
        rows.append(row)
    texts = [
        ("repeats measured in full", lambda runs: f"{sum(r['ok'] for r in runs)}/{len(runs)}"),
        (
            "tokens equal to transformers'",
            lambda runs: f"{sum(bool(r.get('equal')) for r in runs)}/{len(runs)}",
        ),
        (
            "first notice by",
            lambda runs: _counts(r.get("trigger", "none logged") for r in runs if "victim_blocks" in r),
        ),
        ("moves per event", lambda runs: "/".join(str(len(r.get("moves", []))) for r in runs)),
        ("client failovers per run", lambda runs: "/".join(str(r.get("failovers", "-")) for r in runs)),
    ]
    for label, cell in texts:
        row = [label]
        for runs in results.values():
            row += [cell(runs), ""]
        rows.append(row)
    return header, rows


def _counts(items) -> str:
    items = list(items)
    return ", ".join(f"{items.count(x)}x {x}" for x in dict.fromkeys(items)) or "-"


def notes(results: dict[str, list[dict]], repeats: int, fresh: bool) -> str:
    failed = [(s, r) for s, runs in results.items() for r in runs if not r["ok"]]
    text = (
        f"{repeats} repeats per scenario, each in a fresh local swarm: {SERVERS} server processes started without "
        f"a span (`--max-memory` for 2 blocks each, `--max-cache-tokens {CACHE_TOKENS}`, all other settings "
        "default: announce every 30 s, balance check every 15 s and at once when a connection to a peer breaks) "
        "over a tiny 6-layer Llama, and a client with default options (`missing_blocks_timeout_s` 60 s, "
        f"`step_timeout_s` 5 s) generating {NEW_TOKENS} tokens greedily. Scenarios: "
        + "; ".join(f"{k}: {v}" for k, v in SCENARIOS.items() if k in results)
        + ". The server that leaves is the only one of some blocks. "
        + (
            "It leaves as soon as the servers cover the model, before their first balance check (fresh swarm: "
            "a server holds connections only to the peers it measured its network to and pushes to). "
            if fresh
            else f"It leaves once every server has had its first balance check ({SETTLE_S:.0f} s after they came "
            "online; settled swarm: that check's pings leave each server a connection to each other). "
        )
        + "Server times from their log lines (ms timestamps) and the mover's own load/announce figures; coverage "
        "from DHT look-ups every 0.25 s from the leave on, not counting the server that left (its records stay "
        "until they expire, 90 s). Route and replay: the sum over the generation's failover records (none "
        "when the client lost the server before it opened the session: its wait is then in the first token)."
    )
    left = [(s, r) for s, runs in results.items() for r in runs if "victim_blocks" in r]
    covered = [(s, r) for s, r in left if "covered_s" in r]
    if left:
        text += (
            f"\n\nThe client waits up to {CLIENT_WAIT_S:.0f} s (its default `missing_blocks_timeout_s`) for blocks "
            "without a server. "
        )
        if len(covered) < len(left):
            text += (
                f"In {len(left) - len(covered)} of {len(left)} events the blocks were not all online again "
                f"{COVER_TIMEOUT_S:.0f} s after the leave: the whole event does NOT fit inside that wait. "
            )
        if covered:
            worst_scenario, worst = max(covered, key=lambda sr: sr[1]["covered_s"])
            spare = CLIENT_WAIT_S - worst["covered_s"]
            text += (
                f"The slowest event here, from the leave to every block online again, took "
                f"{worst['covered_s']:.1f} s ({worst_scenario}): "
                + (
                    f"inside that wait with {spare:.1f} s to spare."
                    if spare > 0
                    else "longer than that wait."
                )
            )
        waits = [(s, r) for s, r in left if r.get("gen_s") is not None]
        if waits:
            worst_scenario, worst = max(waits, key=lambda sr: sr[1]["gen_s"] - sr[1]["clean_s"])
            text += (
                f" The generation lost at most {worst['gen_s'] - worst['clean_s']:.1f} s to the event "
                f"({worst_scenario}, over its fault-free time)"
                + (f" and {len(failed)} failed." if any("gen_error" in r for _, r in failed) else ".")
            )
    several = [(s, r) for s, r in left if len(r.get("moves", [])) > 1]
    if several:
        text += (
            "\n\nEvents with more than one move (seconds after the leave that each was decided): "
            + "; ".join(
                f"{s}, blocks {r['victim_blocks']} left: "
                + ", ".join(f"{m['what']} at {m['decide_s']:.2f}" for m in r["moves"])
                for s, r in several
            )
        )
        text += "."
    if failed:
        text += (
            "\n\nRepeats not measured in full: " + "; ".join(f"{s}: {r['reason']}" for s, r in failed) + "."
        )
    source = source_state()
    return text + (f"\n\n{source}" if source else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenarios", nargs="+", default=DEFAULT_SCENARIOS, choices=list(SCENARIOS))
    parser.add_argument("--no-record", action="store_true", help="print only, don't append to RESULTS.md")
    parser.add_argument("--logs", type=Path, help="keep each repeat's server logs in this folder")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="leave as soon as the servers cover the model, before their first balance check",
    )
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    path = checkpoint("tiny")
    memory = server_memory(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False).tolist()

    results: dict[str, list[dict]] = {s: [] for s in args.scenarios}
    began = time.monotonic()
    for repeat in range(args.repeats):
        for scenario in args.scenarios:  # interleaved: a slow minute of the machine hits every scenario alike
            r = run_repeat(scenario, path, memory, want, fresh=args.fresh, logs=args.logs)
            results[scenario].append(r)
            shown = {k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()}
            print(f"[{time.monotonic() - began:.0f} s] repeat {repeat + 1} {shown}", flush=True)

    header, rows = summarize(results)
    table = markdown_table(header, rows)
    text = notes(results, args.repeats, args.fresh)
    print(table)
    print(text)
    if not args.no_record:
        swarm_state = "fresh swarm" if args.fresh else "settled swarm"
        append_results(
            f"Rebalancing after a sole server leaves (default settings, {swarm_state})", table, text
        )


if __name__ == "__main__":
    main()
