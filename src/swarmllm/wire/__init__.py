"""The one wire format and both transports, used by the client, the server and server-to-server traffic.

- framing.py: the byte layout of a frame (header + msgpack metadata + raw tensor bytes), limits, wire errors
- connection.py: calls over one byte stream: the caller's Connection/Stream and the callee's serve_connection
- validation.py: checks on the fields and tensors a peer sends, before they reach a model or a cache
- identity.py: our RSA key and libp2p peer id (the same key file hivemind's P2P uses)
- tls.py: TLS 1.3 contexts with self-signed certificates whose key is the peer's identity key
- swarm_key.py: a private swarm's secret, and the membership tags handshakes exchange
- direct.py: persistent TLS over TCP with a mutual identity handshake (the fast path)
- libp2p.py: the same frames over hivemind P2P binary streams (for peers behind NAT or relays)
- pool.py: one connection per peer, direct when it answers and proves its id, libp2p otherwise
"""

from swarmllm.wire.connection import (
    CallContext,
    Connection,
    ConnectionSlots,
    Handlers,
    Incoming,
    NoticeHandler,
    RequestError,
    Stream,
    StreamClosed,
    StreamHandler,
    TooManyConnections,
    UnaryHandler,
    serve_connection,
)
from swarmllm.wire.direct import (
    DirectServer,
    HandshakeError,
    IdentityMismatch,
    NotAMember,
    connect_direct,
    proves_at,
)
from swarmllm.wire.framing import (
    DEFAULT_LIMITS,
    ConnectionLost,
    Frame,
    FrameError,
    Kind,
    Message,
    PayloadTooLarge,
    RemoteError,
    WireError,
    WireLimits,
    encode_frame,
    read_frame,
)
from swarmllm.wire.identity import Identity, peer_id_from_public_key, verify
from swarmllm.wire.libp2p import PROTOCOL, connect_libp2p, serve_libp2p
from swarmllm.wire.pool import ConnectionPool
from swarmllm.wire.swarm_key import SwarmKey, load_swarm_key

__all__ = [
    "DEFAULT_LIMITS",
    "PROTOCOL",
    "CallContext",
    "Connection",
    "ConnectionPool",
    "ConnectionLost",
    "ConnectionSlots",
    "DirectServer",
    "Frame",
    "FrameError",
    "Handlers",
    "HandshakeError",
    "Identity",
    "IdentityMismatch",
    "Kind",
    "Message",
    "PayloadTooLarge",
    "NotAMember",
    "RemoteError",
    "RequestError",
    "Stream",
    "StreamClosed",
    "SwarmKey",
    "Incoming",
    "NoticeHandler",
    "StreamHandler",
    "TooManyConnections",
    "UnaryHandler",
    "WireError",
    "WireLimits",
    "connect_direct",
    "connect_libp2p",
    "encode_frame",
    "load_swarm_key",
    "peer_id_from_public_key",
    "proves_at",
    "read_frame",
    "serve_connection",
    "serve_libp2p",
    "verify",
]
