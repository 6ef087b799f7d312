"""Every MQTT topic meshdl uses, declared once (DESIGN section 4).

```
meshdl/v1/{mesh}/node/{id}/state        retained birth/will
meshdl/v1/{mesh}/node/{id}/telemetry    periodic load and link quality
meshdl/v1/{mesh}/election               campaign messages
meshdl/v1/{mesh}/leader                 retained leader id + term
meshdl/v1/{mesh}/plan/{plan_id}         retained plan
meshdl/v1/{mesh}/job/{client}/{job}/{request|status|result}   job = "{client}~{id}"
meshdl/v1/{mesh}/route/{hop1}/.../{dst}/{job}/{piece}   tensor pieces (and their acks)
meshdl/v1/{mesh}/model/{id}/manifest    retained user-model offer (graph, tensor table)
meshdl/v1/{mesh}/model/{id}/want        chunk requests (selective acks) for its tensors
meshdl/v1/{mesh}/model/{id}/data/{node} tensor chunks for the node that asked
```

Builders validate every id (no ``/``, ``+``, ``#``, NUL, not empty, bounded length)
and raise :class:`~meshdl.errors.WireError`. Parsers are the exact inverse.
Everything here is pure.

Job topics have a client level (issue 12): every job id names the client that asked
for it (``{client}~{id}``, ``job_name``), and its topics sit under that client
(``job/{client}/{job}/...``), so a broker ACL can let each client read only its own
statuses and results (the generated mosquitto ACL: ``topic read .../job/{client}/+/status``
in that client's own user block) and write only
its own requests. ``job()`` takes the client level from the job id; ``parse()``
refuses a job topic whose level and id disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from meshdl.errors import WireError

PREFIX = "meshdl/v1"
MAX_ID_LEN = 64
MAX_HOPS = 32
JOB_KINDS = ("request", "status", "result")
JOB_SEP = "~"           # job ids are "{client}~{id}"
_FORBIDDEN = ("/", "+", "#", "\x00")


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a legal topic level, else raise WireError."""
    if not isinstance(value, str):
        raise WireError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise WireError(f"{what} must not be empty")
    if len(value) > MAX_ID_LEN:
        raise WireError(f"{what} {value[:20]!r}... is {len(value)} characters; "
                        f"use at most {MAX_ID_LEN}")
    for ch in _FORBIDDEN:
        if ch in value:
            raise WireError(f"{what} {value!r} contains {ch!r}; ids may not contain "
                            "'/', '+', '#' or NUL")
    if not value.isprintable():
        raise WireError(f"{what} {value!r} contains a control character; ids must be "
                        "printable")
    return value


def _base(mesh: str) -> str:
    return f"{PREFIX}/{validate_id(mesh, 'mesh name')}"


# ---------------------------------------------------------------- builders
def node_state(mesh: str, node: str) -> str:
    return f"{_base(mesh)}/node/{validate_id(node, 'node id')}/state"


def node_telemetry(mesh: str, node: str) -> str:
    return f"{_base(mesh)}/node/{validate_id(node, 'node id')}/telemetry"


def node_probe(mesh: str, node: str) -> str:
    """Node-to-node probes: id claims, RTT/throughput pings, emulated link changes."""
    return f"{_base(mesh)}/node/{validate_id(node, 'node id')}/probe"


def election(mesh: str) -> str:
    return f"{_base(mesh)}/election"


def leader(mesh: str) -> str:
    return f"{_base(mesh)}/leader"


def plan(mesh: str, plan_id: str) -> str:
    return f"{_base(mesh)}/plan/{validate_id(plan_id, 'plan id')}"


def job_name(client: str, suffix: str) -> str:
    """The id of a job of ``client``: ``{client}~{suffix}`` (a legal topic level)."""
    validate_id(client, "client id")
    if JOB_SEP in client:
        raise WireError(f"client id {client!r} contains {JOB_SEP!r}, which separates a job "
                        "id's client from the rest; choose another client id")
    return validate_id(f"{client}{JOB_SEP}{suffix}", "job id")


def job_owner(job_id: str) -> str:
    """The client named by a job id (``{client}~{id}``); WireError if it names none."""
    validate_id(job_id, "job id")
    owner, sep, rest = job_id.partition(JOB_SEP)
    if not sep or not owner or not rest:
        raise WireError(f"job id {job_id!r} does not name its client: job ids are "
                        f"'{{client}}{JOB_SEP}{{id}}' (meshdl.wire.topics.job_name)")
    return owner


def job(mesh: str, job_id: str, kind: str) -> str:
    """``job/{client}/{job}/{kind}``; the client level is the one the job id names."""
    if kind not in JOB_KINDS:
        raise WireError(f"job topic kind must be one of {JOB_KINDS}, got {kind!r}")
    return f"{_base(mesh)}/job/{job_owner(job_id)}/{job_id}/{kind}"


def route_topic(mesh: str, hops: Sequence[str], job_id: str, piece: str) -> str:
    """Topic of a piece that still has to visit ``hops`` (the last one is its destination)."""
    if isinstance(hops, str):
        raise WireError("hops must be a sequence of node ids, not a string")
    hops = list(hops)
    if not hops:
        raise WireError("a route needs at least one hop (the destination)")
    if len(hops) > MAX_HOPS:
        raise WireError(f"route has {len(hops)} hops; at most {MAX_HOPS} are allowed")
    path = "/".join(validate_id(h, "hop id") for h in hops)
    return (f"{_base(mesh)}/route/{path}/{validate_id(job_id, 'job id')}/"
            f"{validate_id(piece, 'piece id')}")


# ------------------------------------------------------- subscription filters
def node_state_all(mesh: str) -> str:
    return f"{_base(mesh)}/node/+/state"


def node_telemetry_all(mesh: str) -> str:
    return f"{_base(mesh)}/node/+/telemetry"


def node_probe_dirs(mesh: str, node: str) -> tuple[str, str]:
    """A node's two per-direction probe topics (``node.probe_dir``): retained padding
    only its owner writes and reads back; it carries nothing but its size."""
    base = node_probe(mesh, node)
    return f"{base}/d0", f"{base}/d1"


def node_probe_all(mesh: str) -> str:
    return f"{_base(mesh)}/node/+/probe"


def plan_all(mesh: str) -> str:
    return f"{_base(mesh)}/plan/+"


def job_all(mesh: str, kind: str = "+", client: str = "+") -> str:
    """Every job topic of ``kind``: of every client, or of one (``client``)."""
    if kind != "+" and kind not in JOB_KINDS:
        raise WireError(f"job topic kind must be one of {JOB_KINDS} or '+', got {kind!r}")
    level = client if client == "+" else validate_id(client, "client id")
    return f"{_base(mesh)}/job/{level}/+/{kind}"


def route_inbox(mesh: str, node: str) -> str:
    """What node ``node`` subscribes to for the pieces it relays or consumes."""
    return f"{_base(mesh)}/route/{validate_id(node, 'node id')}/#"


def model_manifest(mesh: str, model_id: str) -> str:
    """Retained offer of a user model (issue 13): its manifest, no weights."""
    return f"{_base(mesh)}/model/{validate_id(model_id, 'model id')}/manifest"


def model_want(mesh: str, model_id: str) -> str:
    return f"{_base(mesh)}/model/{validate_id(model_id, 'model id')}/want"


def model_want_all(mesh: str) -> str:
    return f"{_base(mesh)}/model/+/want"


def model_data(mesh: str, model_id: str, node: str) -> str:
    return (f"{_base(mesh)}/model/{validate_id(model_id, 'model id')}/data/"
            f"{validate_id(node, 'node id')}")


def mesh_all(mesh: str) -> str:
    return f"{_base(mesh)}/#"


# ---------------------------------------------------------------- parsing
@dataclass(frozen=True)
class ParsedTopic:
    """A meshdl topic taken apart. ``kind`` is one of: state, telemetry, election,
    leader, plan, job, route, model. Only the fields of that kind are set."""

    kind: str
    mesh: str
    node: str | None = None
    plan_id: str | None = None
    job: str | None = None
    job_kind: str | None = None
    hops: tuple[str, ...] = ()
    piece: str | None = None
    client: str | None = None      # job topics: the client level


def _levels(topic: str) -> list[str]:
    if not isinstance(topic, str):
        raise WireError(f"topic must be a string, got {type(topic).__name__}")
    head = PREFIX + "/"
    if not topic.startswith(head):
        raise WireError(f"topic {topic[:80]!r} is not under {PREFIX}/")
    return topic[len(head):].split("/")


def parse(topic: str) -> ParsedTopic:
    """Classify any meshdl topic; raise WireError for anything off-contract."""
    lv = _levels(topic)
    if len(lv) < 2:
        raise WireError(f"topic {topic!r} has no kind after the mesh name")
    mesh = validate_id(lv[0], "mesh name")
    kind, rest = lv[1], lv[2:]
    if kind == "node" and len(rest) == 2 and rest[1] in ("state", "telemetry", "probe"):
        return ParsedTopic(rest[1], mesh, node=validate_id(rest[0], "node id"))
    if kind == "node" and len(rest) == 3 and rest[1] == "probe" and rest[2] in ("d0", "d1"):
        return ParsedTopic("probe_dir", mesh, node=validate_id(rest[0], "node id"))
    if kind in ("election", "leader") and not rest:
        return ParsedTopic(kind, mesh)
    if kind == "plan" and len(rest) == 1:
        return ParsedTopic("plan", mesh, plan_id=validate_id(rest[0], "plan id"))
    if kind == "job" and len(rest) == 3 and rest[2] in JOB_KINDS:
        client = validate_id(rest[0], "client id")
        if job_owner(rest[1]) != client:
            raise WireError(f"job {rest[1]!r} published under client {client!r}, not the "
                            "client its id names")
        return ParsedTopic("job", mesh, job=rest[1], job_kind=rest[2], client=client)
    if kind == "model" and len(rest) >= 2 and rest[1] in ("manifest", "want", "data"):
        # user-model delivery (issue 13): job = the model id, job_kind = the message kind,
        # node = the requester a data topic is for
        if (rest[1] == "data") != (len(rest) == 3):
            raise WireError(f"topic {topic[:120]!r} is not a meshdl/v1 model topic")
        return ParsedTopic("model", mesh, job=validate_id(rest[0], "model id"),
                           job_kind=rest[1],
                           node=validate_id(rest[2], "node id") if len(rest) == 3 else None)
    if kind == "route":
        m, hops, j, p = parse_route(topic)
        return ParsedTopic("route", m, hops=hops, job=j, piece=p)
    raise WireError(f"topic {topic[:120]!r} is not a meshdl/v1 topic")


def parse_route(topic: str) -> tuple[str, tuple[str, ...], str, str]:
    """``route/{hop1}/.../{dst}/{job}/{piece}`` -> (mesh, hops, job, piece)."""
    lv = _levels(topic)
    if len(lv) < 5 or lv[1] != "route":
        raise WireError(f"topic {topic[:120]!r} is not a route topic "
                        f"({PREFIX}/MESH/route/HOP.../DST/JOB/PIECE)")
    mesh = validate_id(lv[0], "mesh name")
    hops = tuple(validate_id(h, "hop id") for h in lv[2:-2])
    if len(hops) > MAX_HOPS:
        raise WireError(f"route has {len(hops)} hops; at most {MAX_HOPS} are allowed")
    return mesh, hops, validate_id(lv[-2], "job id"), validate_id(lv[-1], "piece id")


@dataclass(frozen=True)
class RouteStep:
    """What a node does with a piece: consume it, or forward it to ``topic``."""

    consume: bool
    next_hop: str | None
    topic: str | None
    job: str
    piece: str


def next_hop(topic: str, self_id: str) -> RouteStep:
    """Strip ``self_id`` (which must be the first hop) from a route topic.

    If nothing is left before ``{job}``, the piece is for us (``consume=True``);
    otherwise forward it unchanged to ``topic`` (the next hop's inbox).
    """
    mesh, hops, job_id, piece = parse_route(topic)
    if hops[0] != self_id:
        raise WireError(f"piece on {topic[:120]!r} is addressed to {hops[0]!r}, not "
                        f"{self_id!r}; subscribe with route_inbox() only")
    rest = hops[1:]
    if not rest:
        return RouteStep(True, None, None, job_id, piece)
    return RouteStep(False, rest[0], route_topic(mesh, rest, job_id, piece), job_id, piece)


def return_route(path: Sequence[str]) -> list[str]:
    """Hops an ack follows back along ``path`` (sender first ... destination last):
    everything but the destination, reversed. ``path`` needs >= 2 nodes."""
    path = list(path)
    if len(path) < 2:
        raise WireError("a return route needs a path of at least two nodes")
    return path[-2::-1]


# ---------------------------------------------------------------- matching
def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest, including the parent).

    Topics starting with ``$`` match no filter starting with a wildcard.
    """
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    pl = pattern.split("/")
    tl = topic.split("/")
    for i, p in enumerate(pl):
        if p == "#":
            return i == len(pl) - 1
        if i >= len(tl):
            return False
        if p != "+" and p != tl[i]:
            return False
    return len(pl) == len(tl)


def validate_filter(pattern: str) -> str:
    """Check an MQTT subscription filter's wildcard placement."""
    if not isinstance(pattern, str) or not pattern:
        raise WireError("a subscription filter must be a non-empty string")
    levels = pattern.split("/")
    for i, lv in enumerate(levels):
        if "#" in lv and (lv != "#" or i != len(levels) - 1):
            raise WireError(f"filter {pattern!r}: '#' must be a whole, last level")
        if "+" in lv and lv != "+":
            raise WireError(f"filter {pattern!r}: '+' must be a whole level")
    return pattern


def validate_publish_topic(topic: str) -> str:
    if not isinstance(topic, str) or not topic:
        raise WireError("a publish topic must be a non-empty string")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise WireError(f"publish topic {topic[:120]!r} must not contain wildcards or NUL")
    if len(topic.encode()) > 65535:
        raise WireError("publish topic longer than 65535 bytes")
    return topic

