"""Who may store what in the swarm's DHT: record validators that every peer of ours runs on every store and read.

- `OwnedRecordsValidator`: a record must sit under an owner subkey ("[owner:<rsa key>]"), which hivemind's
  RSASignatureValidator then requires to be signed by that key. Unsigned or unowned records (including model
  registry entries) are refused when a peer asks us to store them, not only dropped when read. The subkey must
  be the owner tag and nothing else, its key written as the key writes itself, and the value at most
  `info.MAX_RECORD_BYTES`: one key holds one small record per peer. hivemind's validator only searches the subkey
  for a tag, and a key parses alike with any comment after it, so one peer could sign thousands of subkeys
  ("[owner:<its key>]1", "[owner:<its key> 2]", ...) under a block key, or megabytes of value, and make every
  look-up of that block take seconds. A reader drops a peer's whole answer for a key when one record in it fails
  (which is hivemind's rule), so a peer that serves such records is not heard for that key.
- `SwarmKeyValidator` (private swarms): every value is sealed with AES-GCM under a key derived from the swarm key,
  with the record's key, subkey and expiration as associated data. A peer without the swarm key can neither make
  a record that members accept nor read what members store; a sealed value moved to another key, subkey or
  expiration no longer opens.

Members still answer outsiders' DHT look-ups (p2pd has no pnet option): they get sealed bytes they cannot open.
"""

from __future__ import annotations

import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPublicKey

from swarmllm.dht.info import MAX_RECORD_BYTES
from swarmllm.wire.swarm_key import SwarmKey

_TAG_RE = re.compile(rb"\[owner:([^\]]+)\]")  # exactly one tag (hivemind's pattern would match two in a row)
_NONCE_BYTES = 12


class OwnedRecordsValidator(RecordValidatorBase):
    """Refuses records whose subkey is not exactly one owner tag (RSASignatureValidator checks the owner's
    signature), and values over `MAX_RECORD_BYTES`."""

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > MAX_RECORD_BYTES:
            return False
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            tag = _TAG_RE.fullmatch(subkey) if isinstance(subkey, bytes) else None
            return tag is not None and RSAPublicKey.from_bytes(tag.group(1)).to_bytes() == tag.group(1)
        except Exception:  # noqa: BLE001 - whatever garbage a peer sends is no owner tag
            return False

    @property
    def priority(self) -> int:
        return 0  # validated after RSASignatureValidator (10) has checked and stripped the signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, OwnedRecordsValidator)


class SwarmKeyValidator(RecordValidatorBase):
    """Seals values for members of a private swarm (AES-GCM, the record's key/subkey/expiration authenticated)."""

    def __init__(self, swarm_key: SwarmKey):
        self._aead = AESGCM(swarm_key.derive(b"swarmllm dht records"))

    @staticmethod
    def _associated_data(record: DHTRecord) -> bytes:
        return MSGPackSerializer.dumps((record.key, record.subkey, record.expiration_time))

    def sign_value(self, record: DHTRecord) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, record.value, self._associated_data(record))

    def _open(self, record: DHTRecord) -> bytes | None:
        nonce, sealed = record.value[:_NONCE_BYTES], record.value[_NONCE_BYTES:]
        if len(nonce) != _NONCE_BYTES:
            return None
        try:
            return self._aead.decrypt(nonce, sealed, self._associated_data(record))
        except InvalidTag:
            return None

    def validate(self, record: DHTRecord) -> bool:
        return self._open(record) is not None

    def strip_value(self, record: DHTRecord) -> bytes:
        opened = self._open(record)
        return opened if opened is not None else record.value

    @property
    def priority(self) -> int:
        return 20  # seals after RSASignatureValidator signs, opens before it checks

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def record_validators(signer: RSASignatureValidator, swarm_key: SwarmKey | None) -> list[RecordValidatorBase]:
    """What every swarmllm DHT peer runs: owner signatures, owned records only, and the swarm key if private."""
    validators = [signer, OwnedRecordsValidator()]
    return validators + ([SwarmKeyValidator(swarm_key)] if swarm_key is not None else [])


__all__ = ["OwnedRecordsValidator", "SwarmKeyValidator", "record_validators"]
