"""The monitor's one picture of the swarm, `/api/v1/state`, built here and only here: the page renders it, the
Prometheus text is derived from it. Pure: it takes what a look-up found (plain records and numbers) and returns
plain JSON-able data, so it is tested without a network.

Schema `swarmllm.monitor.state/1` (times are Unix seconds, throughputs decode steps/s through one block):
```
{
  "schema": "swarmllm.monitor.state/1",
  "updated_at": float | null,          # when the last complete look-up finished (null: none yet)
  "refresh_s": float,                  # how often the monitor looks the swarm up
  "dht": {"status": "ok" | "slow" | "empty" | "unreachable" | "starting",
          "lookup_s": float | null,    # how long the last look-up took
          "failures": int,             # look-ups that failed or timed out since the monitor started
          "message": str},             # what the status means, for people
  "models": [{
      "name": str,                     # the model's DHT prefix
      "repository": str | null,        # what its servers loaded (hub id or folder)
      "num_blocks": int,
      "verdict": "healthy" | "broken", # broken: some block has no online server that answers (of the
                                       # checkpoint clients get furthest with: see `checkpoints`)
      "missing_blocks": [int],
      "missing": str,                  # the same as ranges, e.g. "3..5, 9"
      "checkpoints": [str],            # the model fingerprints its servers announce: more than one means
                                       # checkpoints of one name, never chained together; the verdict, missing
                                       # blocks and bottleneck are those of the one clients get furthest with
      "servers": {"online": int, "joining": int, "offline": int, "unreachable": int},
      "bottleneck_tps": float,         # the weakest block's total throughput (what one request can get)
      "blocks": [{"index": int, "throughput_tps": float,
                  "servers": [{"peer_id": str, "state": str}]}],
      "history": [{"t": float, "online": int, "bottleneck_tps": float}],
      "looked_up_at": float | null     # when this entry was looked up: `updated_at`, or earlier for a model
                                       # that waits its turn (also in `not_looked_up`), shown as last found
  }],
  "servers": [{
      "model": str, "peer_id": str, "public_name": str | null, "version": str,
      "state": "online" | "joining" | "offline" | "unreachable",  # unreachable: announced online, no answer
      "announced_state": "online" | "joining" | "offline",
      "start_block": int, "end_block": int,
      "throughput": float, "inference_rps": float, "forward_rps": float, "network_rps": float | null,
      "dtype": str, "quantization": str, "cache_tokens_left": int, "adapters": [str],
      "busy_rows": int,                                 # rows of its sessions that stepped in the last 30 s
      "connection": "direct" | "relayed" | "libp2p",   # direct: announces a direct TCP address
      "rtt_ms": float | null                            # the monitor's `info` round trip (null: no answer)
  }],
  "not_looked_up": [{                  # models announced but not looked up this refresh (see below)
      "name": str, "repository": str | null, "num_blocks": int,
      "reason": str                    # why, for people
  }]
}
```
A server whose record says online but that does not answer the monitor is `unreachable` and counts as missing
for the verdict; `offline` is what a server announces when it leaves (it drains its sessions, then exits).
A refresh looks up at most a budget of block keys over all models, those waiting longest first, then the smallest
(one peer may announce a model of thousands of blocks, whose look-up alone would outlast the refresh, or many small
ones); a model that does not fit is listed in `not_looked_up`, not in `models`: one larger than the budget always,
another until its turn comes (`monitor.app.models_to_look_up`); one looked up before stays in `models` meanwhile, as
its last look-up found it (`looked_up_at`; its servers' rows too), and gains no history point until looked up again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from swarmllm.balancing import block_throughputs, swarm_bottleneck
from swarmllm.client.routing import missing_blocks
from swarmllm.dht import ModelInfo, ServerInfo, ServerState
from swarmllm.dht.info import same_checkpoint

SCHEMA = "swarmllm.monitor.state/1"
UNREACHABLE = "unreachable"
STATES = ("online", "joining", "offline", UNREACHABLE)


def block_ranges(blocks: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> "3..5, 9"."""
    out: list[str] = []
    for b in blocks:
        if out and b == out[-1][1] + 1:
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in out)


def server_state(info: ServerInfo, rtt_s: float | None) -> str:
    """What the monitor shows: the announced state, or `unreachable` for a server announced online that did not
    answer the monitor's ping (a joining one may not answer yet: it starts serving only once loaded)."""
    if info.state == ServerState.ONLINE and rtt_s is None:
        return UNREACHABLE
    return info.state.value


def best_checkpoint(live: Sequence[ServerInfo], num_blocks: int) -> list[ServerInfo]:
    """The live servers of the one checkpoint under this name that a client gets furthest with (fewest blocks
    missing, then the highest bottleneck): clients chain only servers of their own checkpoint
    (`dht.info.same_checkpoint`: ladder layers, model fingerprint and hub commit; a record without a fingerprint
    or commit counts with any), so servers of two checkpoints that only together hold every block serve no
    client."""
    best: tuple[tuple[int, float], list[ServerInfo]] | None = None
    known = {(s.ladder, s.fingerprint, s.commit) for s in live if s.fingerprint is not None}
    # (a record without a fingerprint is a checkpoint of its own only where no server of its ladder has one)
    unknown = {(s.ladder, None, None) for s in live if not any(k[0] == s.ladder for k in known)}
    for ladder, fingerprint, commit in known | unknown:
        group = [s for s in live if same_checkpoint(s, ladder, fingerprint, commit)]
        spans = [(s.start_block, s.end_block, s.throughput) for s in group]
        rank = (len(missing_blocks(group, num_blocks)), -swarm_bottleneck(num_blocks, spans))
        if best is None or rank < best[0]:
            best = rank, group
    return [] if best is None else best[1]


def model_state(
    model: ModelInfo,
    servers: Sequence[ServerInfo],
    rtt_s: Mapping[str, float | None],
    history: Sequence[Mapping[str, float]] = (),
    now: float | None = None,
) -> dict:
    """One model's entry: block map, verdict, counts, bottleneck, and the `history` points given (followed by
    this look-up's own point, at time `now`, when given)."""
    states = {s.peer_id: server_state(s, rtt_s.get(s.peer_id)) for s in servers}
    live = best_checkpoint([s for s in servers if states[s.peer_id] == "online"], model.num_blocks)
    missing = missing_blocks(live, model.num_blocks)
    spans = [(s.start_block, s.end_block, s.throughput) for s in live]
    per_block = block_throughputs(model.num_blocks, spans)
    ordered = sorted(servers, key=lambda s: (s.start_block, s.end_block, s.peer_id))
    blocks = [
        {
            "index": b,
            "throughput_tps": per_block[b],
            "servers": [
                {"peer_id": s.peer_id, "state": states[s.peer_id]}
                for s in ordered
                if s.start_block <= b < s.end_block
            ],
        }
        for b in range(model.num_blocks)
    ]
    entry = {
        "name": model.dht_prefix,
        "repository": model.repository,
        "num_blocks": model.num_blocks,
        "verdict": "broken" if missing else "healthy",
        "missing_blocks": missing,
        "missing": block_ranges(missing),
        "checkpoints": sorted({s.fingerprint for s in servers if s.fingerprint is not None}),
        "servers": {state: sum(1 for v in states.values() if v == state) for state in STATES},
        "bottleneck_tps": swarm_bottleneck(model.num_blocks, spans) if spans else 0.0,
        "blocks": blocks,
        "history": [dict(point) for point in history],
    }
    if now is not None:
        entry["history"].append(history_point(entry, now))
    return entry


def server_row(model: str, info: ServerInfo, rtt_s: float | None) -> dict:
    if info.using_relay:
        connection = "relayed"
    else:
        connection = "direct" if info.direct_addrs else "libp2p"
    return {
        "model": model,
        "peer_id": info.peer_id,
        "public_name": info.public_name,
        "version": info.version,
        "state": server_state(info, rtt_s),
        "announced_state": info.state.value,
        "start_block": info.start_block,
        "end_block": info.end_block,
        "throughput": info.throughput,
        "inference_rps": info.inference_rps,
        "forward_rps": info.forward_rps,
        "network_rps": info.network_rps,
        "dtype": info.dtype,
        "quantization": info.quantization,
        "cache_tokens_left": info.cache_tokens_left,
        "adapters": list(info.adapters),
        "busy_rows": info.busy_rows,
        "connection": connection,
        "rtt_ms": None if rtt_s is None else rtt_s * 1e3,
    }


def swarm_state(
    models: Sequence[ModelInfo],
    servers: Mapping[str, Sequence[ServerInfo]],
    rtt_s: Mapping[str, float | None],
    *,
    history: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
    dht: Mapping | None = None,
    updated_at: float | None = None,
    refresh_s: float = 5.0,
    not_looked_up: Sequence[ModelInfo] = (),
    block_budget: int = 0,
    looked_up_at: Mapping[str, float] | None = None,
) -> dict:
    """The whole state document (schema above). `servers`: per model (DHT prefix), its records; `rtt_s`: per
    peer, the monitor's round trip or None when it did not answer; `history`: per model, earlier chart points
    (this look-up's point, at `updated_at`, is added after them); `not_looked_up`: announced models this look-up
    skipped, their blocks not fitting in what was left of the `block_budget` keys a refresh looks up;
    `looked_up_at`: per model of `models` found by an earlier look-up, when (its `servers` and `rtt_s` are that
    look-up's)."""
    history, earlier = history or {}, looked_up_at or {}
    return {
        "schema": SCHEMA,
        "updated_at": updated_at,
        "refresh_s": refresh_s,
        "dht": dict(dht or dht_status("starting")),
        "models": [
            {
                **model_state(
                    m,
                    servers.get(m.dht_prefix, ()),
                    rtt_s,
                    history.get(m.dht_prefix, ()),
                    None if m.dht_prefix in earlier else updated_at,
                ),
                "looked_up_at": earlier.get(m.dht_prefix, updated_at),
            }
            for m in models
        ],
        "servers": [
            server_row(m.dht_prefix, s, rtt_s.get(s.peer_id))
            for m in models
            for s in sorted(servers.get(m.dht_prefix, ()), key=lambda s: (s.start_block, s.peer_id))
        ],
        "not_looked_up": [
            {
                "name": m.dht_prefix,
                "repository": m.repository,
                "num_blocks": m.num_blocks,
                "reason": f"announces {m.num_blocks} blocks; the monitor looks up at most {block_budget} blocks "
                "per refresh, over all models, those waiting longest first"
                + ("" if m.num_blocks > block_budget else ": this one waits its turn"),
            }
            for m in not_looked_up
        ],
    }


_DHT_MESSAGES = {
    "ok": "",
    "starting": "joining the DHT; the first look-up has not finished yet",
    "empty": "the DHT answered, but no model is announced in it (no server has joined yet, or the monitor "
    "is not in the swarm you meant: check --initial-peers and, for a private swarm, --swarm-key)",
    "slow": "the last DHT look-up timed out; showing what the look-up before it found",
    "unreachable": "the DHT look-up failed; showing what the last good look-up found",
}


def dht_status(status: str, lookup_s: float | None = None, failures: int = 0, detail: str = "") -> dict:
    message = _DHT_MESSAGES[status] + (f" ({detail})" if detail else "")
    return {"status": status, "lookup_s": lookup_s, "failures": failures, "message": message}


def history_point(model: Mapping, t: float) -> dict:
    """A chart point from a model's entry: online servers and bottleneck throughput at time `t`."""
    return {"t": t, "online": model["servers"]["online"], "bottleneck_tps": model["bottleneck_tps"]}


def state_text(state: Mapping) -> str:
    """The state as `swarmllm status` prints it: each model's verdict and, under it, its servers by blocks."""
    lines = []
    for model in state["models"]:
        counts = ", ".join(f"{n} {name}" for name, n in model["servers"].items() if n)
        verdict = model["verdict"] + ("" if not model["missing"] else f" (blocks {model['missing']} missing)")
        lines.append(
            f"{model['name']}: {verdict}; {model['num_blocks']} blocks, bottleneck "
            f"{model['bottleneck_tps']:.1f} steps/s, servers: {counts or 'none'}"
        )
        for row in (r for r in state["servers"] if r["model"] == model["name"]):
            rtt = "no answer" if row["rtt_ms"] is None else f"{row['rtt_ms']:.1f} ms"
            name = f" {row['public_name']}" if row["public_name"] else ""
            lines.append(
                f"  [{row['start_block']}, {row['end_block']})  {row['peer_id']}{name}  {row['state']}  "
                f"{row['throughput']:.1f} steps/s  {row['dtype']}"
                + ("" if row["quantization"] == "none" else f"+{row['quantization']}")
                + f"  {row['connection']}  {rtt}"
            )
    for model in state["not_looked_up"]:
        lines.append(f"{model['name']}: not looked up ({model['reason']})")
    return "\n".join(lines)
