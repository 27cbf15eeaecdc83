"""Who we are on the wire: an RSA key and the libp2p peer id derived from it.

The same key file serves both transports: hivemind's ``P2P.create(identity_path=...)`` reads it for the libp2p
daemon, and the direct transport signs its handshake with it, so a peer has one id whichever way it is reached.
Public keys travel in hivemind's OpenSSH encoding (``RSAPublicKey.to_bytes``), signatures in hivemind's format.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

_SHA2_256_MULTIHASH_PREFIX = bytes([0x12, 0x20])  # multihash code sha2-256, digest length 32


class Identity:
    """An RSA key whose libp2p peer id is derived from it (hivemind uses RSA identities)."""

    def __init__(self, private_key: RSAPrivateKey):
        self.private_key = private_key
        public_key = private_key.get_public_key()
        self.public_key_bytes: bytes = public_key.to_bytes()
        self.peer_id: str = peer_id_from_public_key(public_key)

    def __repr__(self) -> str:
        return f"<Identity {self.peer_id}>"

    @classmethod
    def generate(cls) -> Identity:
        return cls(RSAPrivateKey())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        """Read a key file in the format hivemind's P2P reads (a serialized libp2p crypto PrivateKey); ValueError
        naming the file if it holds no such key."""
        try:
            key = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
        except DecodeError:
            raise ValueError(f"{path}: not an identity key file (a libp2p RSA private key)") from None
        if key.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError(f"{path}: expected an RSA identity, got key type {key.key_type}")
        try:
            der_key = serialization.load_der_private_key(key.data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(f"{path}: not an identity key file (its data is not a private key)") from None
        if not isinstance(der_key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: the key data is not an RSA private key")
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)
        # hivemind's RSAPrivateKey has no public constructor from existing key bytes; its unpickling path is one
        private_key.__setstate__({"_private_key": key.data})
        return cls(private_key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        """The key in `path`, made there first if there is none. Processes started at once with the same new file
        all end with the one key it holds: a new key is linked into place only where no file is yet."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        written = identity._write_beside(path)
        try:
            os.link(written, path)  # (never replaces: FileExistsError if another process made it meanwhile)
        except FileExistsError:
            return cls.load(path)
        except OSError:  # a filesystem without hard links: renamed into place, as save does (last one wins)
            os.replace(written, path)
            return identity
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(written)
        return identity

    def save(self, path: str | os.PathLike) -> None:
        """Write the key readable only by its owner, atomically, so a crash never leaves half a key behind."""
        written = self._write_beside(Path(path))
        try:
            os.replace(written, path)
        except BaseException:
            os.unlink(written)
            raise

    def _write_beside(self, path: Path) -> Path:
        """The key in a new file of its own (mode 0600) in `path`'s folder, ready to be renamed or linked there."""
        key = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=self.private_key.to_bytes())
        fd, written = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(key.SerializeToString())
        except BaseException:
            os.unlink(written)
            raise
        return Path(written)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def peer_id_from_public_key(public_key: RSAPublicKey) -> str:
    """The base58 libp2p peer id: sha2-256 multihash of the protobuf-wrapped DER public key (as
    PeerID.from_identity)."""
    der = serialization.load_ssh_public_key(public_key.to_bytes()).public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return peer_id_from_der_public_key(der)


def peer_id_from_der_public_key(der: bytes) -> str:
    """The peer id of an RSA public key in DER SubjectPublicKeyInfo form (as a TLS certificate carries it)."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    return PeerID(_SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(encoded).digest()).to_base58()


def public_key_from_bytes(public_key_bytes: bytes) -> RSAPublicKey:
    """Parse a peer's public key; ValueError if it is not an RSA key in hivemind's encoding."""
    try:
        return RSAPublicKey.from_bytes(public_key_bytes)
    # cryptography's ssh parser raises these on garbage, and UnsupportedAlgorithm on an unknown key type
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as e:
        raise ValueError(f"not an RSA public key: {e}") from None


def verify(public_key_bytes: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the owner of ``public_key_bytes`` signing ``data``; False on any malformed input."""
    try:
        public_key = public_key_from_bytes(public_key_bytes)
    except ValueError:
        return False
    return public_key.verify(data, signature)
