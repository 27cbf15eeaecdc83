"""Random JSON schemas (every keyword structured output supports) and values they admit, written as the
recogniser writes objects (declared keys in order), for the structured-output tests."""

import json
import random

import jsonschema

NAMES = ["a", "b", "name", "é", 'q"uote', "back\\slash", "k1", "中"]
SCALARS = [0, 1, 12, -3, 1.5, 1e20, "x", "xy", "é", "", True, False, None]
PATTERNS = {
    r"^[a-z]{2,4}$": ["ab", "xyz", "abcd"],
    r"^\d{3}-\d{4}$": ["555-1234"],
    r"^(yes|no)$": ["yes", "no"],
    r"é+": ["é", "aéé b", 'q"é\n'],
    r"^[^\s]+$": ["中文", "a\\b"],
}
FORMAT_VALUES = {
    "date": ["2024-02-29", "1999-12-31"],
    "date-time": ["2024-05-01T13:45:30Z", "2024-05-01T13:45:30.25+05:30"],
    "time": ["08:00:00Z"],
    "duration": ["P3DT4H", "PT15M"],
    "uuid": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
    "ipv4": ["10.0.0.255"],
    "email": ["jane.doe@example.com"],
    "hostname": ["api.example.org"],
    "uri": ["https://example.com/x?y=1"],
}


def _schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "any", "nullable"]
    kinds += ["lengths", "pattern", "format", "bounded integer", "bounded number"]
    if depth < 3:
        kinds += ["object", "object", "free object", "array", "anyOf", "tuple", "tagged"]
    kind = rng.choice(kinds)
    if kind == "object":
        names = rng.sample(NAMES, rng.randint(1, 4))
        schema = {"type": "object", "properties": {n: _schema(rng, depth + 1) for n in names}}
        schema["required"] = [n for n in names if rng.random() < 0.5]
        if rng.random() < 0.5:
            schema["additionalProperties"] = False
        return schema
    if kind == "free object":
        return {"type": "object", "additionalProperties": rng.choice([True, _schema(rng, depth + 1)])}
    if kind == "array":
        schema = {"type": "array", "items": _schema(rng, depth + 1)}
        if rng.random() < 0.5:
            schema["minItems"] = rng.randint(0, 2)
            schema["maxItems"] = schema["minItems"] + rng.randint(0, 2)
        return schema
    if kind == "anyOf":
        return {"anyOf": [_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    if kind == "tuple":
        schema = {"type": "array", "prefixItems": [_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
        schema["items"] = rng.choice([False, _schema(rng, depth + 1)])
        return schema
    if kind == "tagged":  # a tagged union, as pydantic's discriminated unions are
        tags = [["a"], ["b", "c"], ["d"]][: rng.randint(2, 3)]
        return {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {
                        "tag": {"const": t[0]} if len(t) == 1 else {"enum": t},
                        "x": _schema(rng, depth + 1),
                    },
                    "required": ["tag"],
                }
                for t in tags
            ]
        }
    if kind == "nullable":
        return {"type": [rng.choice(["string", "integer", "boolean"]), "null"], "title": "a note"}
    if kind == "enum":
        return {"enum": rng.sample(SCALARS, rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(SCALARS), "description": "constrains nothing"}
    if kind == "any":
        return {}
    if kind == "lengths":
        low = rng.randint(0, 3)
        return {
            "type": "string",
            "minLength": low,
            **({"maxLength": low + rng.randint(0, 3)} if rng.random() < 0.7 else {}),
        }
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(list(PATTERNS))}
    if kind == "format":
        return {"type": "string", "format": rng.choice(list(FORMAT_VALUES))}
    if kind in ("bounded integer", "bounded number"):
        low = rng.randint(-20, 20) if kind == "bounded integer" else rng.randint(-80, 80) / 4
        schema = {"type": kind.split()[1]}
        if rng.random() < 0.8:
            schema[rng.choice(["minimum", "exclusiveMinimum"])] = low
        if rng.random() < 0.8 or len(schema) == 1:
            schema[rng.choice(["maximum", "exclusiveMaximum"])] = low + rng.randint(1, 30)
        step = rng.choice([2, 3, 5])
        if rng.random() < 0.3 and any(
            jsonschema.Draft202012Validator({**schema, "multipleOf": step}).is_valid(i)
            for i in range(-30, 60)
        ):
            schema["multipleOf"] = step
        return schema
    return {"type": kind}


def _any(rng: random.Random, depth: int):
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([rng.randint(-1000, 1000), rng.uniform(-1e6, 1e6)])
    if kind in (2, 3):
        return _text(rng)
    if kind == 4:
        return [_any(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {_text(rng): _any(rng, depth + 1) for _ in range(rng.randrange(3))}


def _text(rng: random.Random) -> str:
    return "".join(rng.choice('ab "\\/\n\u00e9\u4e2d\U0001f600') for _ in range(rng.randrange(5)))


def instance_of(rng: random.Random, schema, root: dict, depth: int = 0):
    """A value the schema admits, written as the recogniser writes objects: declared keys in order."""
    if schema is True or schema == {}:
        return _any(rng, depth)
    if "$ref" in schema:
        return instance_of(rng, root["$defs"][schema["$ref"].split("/")[-1]], root, depth)
    if "anyOf" in schema or "oneOf" in schema:
        return instance_of(rng, rng.choice(schema.get("anyOf") or schema["oneOf"]), root, depth)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    kind = schema["type"]
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if "pattern" in schema:
        return rng.choice(PATTERNS[schema["pattern"]])
    if "format" in schema:
        return rng.choice(FORMAT_VALUES[schema["format"]])
    if "minLength" in schema:
        length = rng.randint(schema["minLength"], schema.get("maxLength", schema["minLength"] + 3))
        return "".join(rng.choice('ab "\\/\n\u00e9\u4e2d\U0001f600') for _ in range(length))
    if {"minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"} & set(schema):
        while True:
            whole = kind == "integer" or "multipleOf" in schema  # (a multiple is written as an integer)
            value = rng.randint(-100, 100) if whole else round(rng.uniform(-100, 100), 2)
            if jsonschema.Draft202012Validator(schema).is_valid(value):
                return value
    if kind == "object" and "properties" in schema:
        return {
            name: instance_of(rng, sub, root, depth + 1)
            for name, sub in schema["properties"].items()
            if name in schema["required"] or rng.random() < 0.5
        }
    if kind == "object":
        extra = schema["additionalProperties"]
        return {_text(rng): instance_of(rng, extra, root, depth + 1) for _ in range(rng.randrange(3))}
    if kind == "array" and "prefixItems" in schema:
        first = [instance_of(rng, item, root, depth + 1) for item in schema["prefixItems"]]
        more = 0 if schema["items"] is False else rng.randrange(3)
        return first + [instance_of(rng, schema["items"], root, depth + 1) for _ in range(more)]
    if kind == "array":
        count = rng.randint(schema.get("minItems", 0), schema.get("maxItems", 3))
        return [instance_of(rng, schema["items"], root, depth + 1) for _ in range(count)]
    return {
        "string": lambda: _text(rng),
        "integer": lambda: rng.randint(-(10**6), 10**6),
        "number": lambda: rng.choice(
            [rng.randint(-9, 9), rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-30, 30)]
        ),
        "boolean": lambda: rng.random() < 0.5,
        "null": lambda: None,
    }[kind]()


def random_schema(rng: random.Random) -> dict:
    """A random schema, a third of them with a definition that one of its properties refers to."""
    schema = _schema(rng)
    if rng.random() < 0.33:
        schema = {
            "$defs": {"Item": schema},
            "type": "object",
            "properties": {
                "item": {"$ref": "#/$defs/Item"},
                "more": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
            },
            "required": ["item"],
            "additionalProperties": False,
        }
    return schema


def json_text(rng: random.Random, value) -> bytes:
    indent = rng.choice([None, None, 1, 2])
    separators = rng.choice([None, (",", ":"), (", ", ": ")])
    return json.dumps(value, indent=indent, separators=separators, ensure_ascii=False).encode()
