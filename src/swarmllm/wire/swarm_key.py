"""The secret of a private swarm: a file whose bytes only members hold.

A member proves it holds the key without sending it: handshakes (direct and libp2p) exchange HMAC-SHA256 tags over
the handshake transcript, and DHT records are sealed with AES-GCM (`dht.membership`). Both use keys derived from
the file's bytes with HKDF-SHA256 under distinct labels, so a tag made for one use never verifies in another.
The bundled p2pd has no pre-shared-key (pnet) option, which is why membership is enforced here, per use, and not
by libp2p for every byte.

Make a key with ``head -c 32 /dev/urandom > swarm.key`` (or ``python -c "import os; os.write(1, os.urandom(32))"``)
and copy it to every member.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_SECRET_BYTES = 16


class SwarmKey:
    def __init__(self, secret: bytes):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"a swarm key needs at least {MIN_SECRET_BYTES} secret bytes, got {len(secret)} "
                "(make one with: head -c 32 /dev/urandom > swarm.key)"
            )
        self._secret = secret
        self._handshake_key = self.derive(b"swarmllm handshake")

    def __repr__(self) -> str:
        return "<SwarmKey>"  # never the secret, not even a hash of it

    @classmethod
    def load(cls, path: str | os.PathLike) -> SwarmKey:
        return cls(Path(path).read_bytes())

    def derive(self, label: bytes, length: int = 32) -> bytes:
        """A key for one purpose, independent of the keys for other labels."""
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(self._secret)

    def tag(self, transcript: bytes) -> bytes:
        """Proof of membership bound to one handshake's transcript."""
        return hmac.new(self._handshake_key, transcript, hashlib.sha256).digest()

    def check(self, transcript: bytes, tag: object) -> bool:
        return isinstance(tag, bytes) and hmac.compare_digest(self.tag(transcript), tag)


def load_swarm_key(path: str | os.PathLike | None) -> SwarmKey | None:
    """The swarm key from a file, or None (a public swarm) when no file is given."""
    return None if path is None else SwarmKey.load(path)
