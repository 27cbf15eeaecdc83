"""Independent checks of JSON schema string formats (Python's and pydantic's parsers, jsonschema's IDNA
hostname check), for the structured-output tests: `FORMAT_CHECKER` plugs them into jsonschema."""

import ipaddress
import re
import uuid
from datetime import date, datetime, time, timedelta

import jsonschema
from pydantic import TypeAdapter

_HOSTNAMES = jsonschema.FormatChecker(["idn-hostname"])


def _hostname(text: str) -> bool:
    return _HOSTNAMES.conforms(text, "idn-hostname")


def _email(text: str) -> bool:
    local, _, domain = text.partition("@")
    return bool(local) and ".." not in local and "." in domain and _hostname(domain)


CHECKS = {
    "date": lambda t: date.fromisoformat(t) is not None,
    "time": lambda t: time.fromisoformat(t).tzinfo is not None,
    "date-time": lambda t: datetime.fromisoformat(t).tzinfo is not None,
    "duration": lambda t: TypeAdapter(timedelta).validate_python(t) is not None,
    "uuid": lambda t: uuid.UUID(t) is not None,
    "ipv4": lambda t: ipaddress.IPv4Address(t) is not None,
    "hostname": _hostname,
    "email": _email,
    "uri": lambda t: re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:\S+", t) is not None,
}


def conforms(text: str, name: str) -> bool:
    try:
        return CHECKS[name](text)
    except ValueError:  # pydantic's ValidationError is one too
        return False


FORMAT_CHECKER = jsonschema.FormatChecker([])
for _name in CHECKS:
    FORMAT_CHECKER.checks(_name)(lambda text, name=_name: not isinstance(text, str) or conforms(text, name))
