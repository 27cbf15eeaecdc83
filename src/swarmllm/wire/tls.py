"""TLS 1.3 for the direct path, with certificates bound to the peers' libp2p keys (no certificate authority).

A server's certificate is self-signed with its identity key, so the certificate's public key *is* the key its peer
id derives from: a client checks, after the TLS handshake, that the id derived from the presented certificate is
the id it meant to reach (`peer_id_of`). TLS itself proves the server holds that key (CertificateVerify) and
then encrypts and authenticates every byte; nothing here does cryptography of its own.

Clients present no certificate: the standard library cannot verify a self-signed client certificate without a
CA and offers no verify callback, so a client proves its identity inside the encrypted channel instead, by
signing the handshake transcript (which names the server's key, so the proof cannot be relayed to another
server; see `direct.py`).
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from swarmllm.wire.identity import Identity, peer_id_from_der_public_key

# Certificates are checked by key, not by date; a long validity keeps strict TLS stacks from refusing them.
_VALIDITY = datetime.timedelta(days=3650)


class CertificateError(ValueError):
    """The peer's certificate is missing or carries no RSA key that a peer id can be derived from."""


def _private_key(identity: Identity) -> rsa.RSAPrivateKey:
    # hivemind's RSAPrivateKey wraps a `cryptography` key and exposes no accessor for it
    return identity.private_key._private_key


def make_certificate(identity: Identity) -> x509.Certificate:
    """A self-signed X.509 certificate whose key is the identity key (subject = the peer id)."""
    key = _private_key(identity)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .sign(key, hashes.SHA256())
    )


def server_context(identity: Identity) -> ssl.SSLContext:
    """TLS 1.3 only, presenting the identity's certificate; no client certificate is requested."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    key_pem = _private_key(identity).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = make_certificate(identity).public_bytes(serialization.Encoding.PEM)
    # load_cert_chain reads files only; the file is private to this user and removed at once
    fd, path = tempfile.mkstemp(prefix="swarmllm-tls-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + cert_pem)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)
    return context


@cache
def client_context() -> ssl.SSLContext:
    """TLS 1.3 only; the server's certificate is checked by `peer_id_of`, not against a CA or a host name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_id_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The peer id derived from the certificate the peer presented on this TLS connection."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise CertificateError("the peer presented no TLS certificate")
    try:
        public_key = x509.load_der_x509_certificate(der).public_key()
    except ValueError as e:
        raise CertificateError(f"unreadable TLS certificate: {e}") from None
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise CertificateError(f"the TLS certificate's key is {type(public_key).__name__}, not RSA")
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return peer_id_from_der_public_key(spki)
