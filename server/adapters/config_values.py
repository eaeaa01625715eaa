"""`adapter_config.json`: read within bounds, and typed getters whose refusals name the file and the key.

Every problem with the file or a value is `InvalidArgument`, whatever JSON it holds: a value of an unexpected
type, a number too large for a float, nesting too deep for the parser, a file too large to be a config.
Messages name the file by its name in the adapter directory, never by a server path.
"""

import json
import sys
from pathlib import Path

from quiver.errors import InvalidArgument

MAX_CONFIG_BYTES = 1 << 20  # PEFT's configs are a few KB; a bigger file is refused before it is parsed


def read_config(file: Path) -> "ConfigValues":
    """The JSON object in `file` (at most MAX_CONFIG_BYTES)."""
    name = file.name
    with open(file, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"{name}: larger than {MAX_CONFIG_BYTES} bytes; an adapter config is a few KB")
    try:
        values = json.loads(data.decode())
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{name}: malformed JSON (not UTF-8: {e.reason})") from e
    except RecursionError as e:
        raise InvalidArgument(f"{name}: malformed JSON (nested too deeply)") from e
    except ValueError as e:  # JSONDecodeError, or an integer with more digits than Python converts
        raise InvalidArgument(f"{name}: malformed JSON ({e})") from e
    if not isinstance(values, dict):
        raise InvalidArgument(f"{name}: must hold a JSON object, not {type(values).__name__}")
    return ConfigValues(values, name)


class ConfigValues:
    """One adapter config (or one of its objects, e.g. `rank_pattern`), with typed getters."""

    def __init__(self, values: dict, name: str):
        self.values, self.name = values, name

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def refuse(self, problem: str) -> InvalidArgument:
        return InvalidArgument(f"{self.name}: {problem}")

    def integer(self, key: str, *, default: int | None = None, minimum: int = 1) -> int:
        value = self.values.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.refuse(f"{key} must be an integer >= {minimum}, got {short(value)}")
        return value

    def number(self, key: str, *, default: float | None = None, bound: float = sys.float_info.max) -> float:
        """A finite number with |value| <= bound (an integer too large for a float is refused too)."""
        value = self.values.get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not abs(value) <= bound:  # an int compares exactly, however large; NaN compares false
            within = "a finite number" if bound == sys.float_info.max else f"a number with |{key}| <= {bound:g}"
            raise self.refuse(f"{key} must be {within}, got {short(value)}")
        return float(value)

    def string(self, key: str, choices) -> str:
        """One of `choices` (strings)."""
        value = self.values.get(key)
        if not isinstance(value, str) or value not in choices:
            raise self.refuse(f"{key} must be one of {sorted(choices)}, got {short(value)}")
        return value

    def layers(self, key: str, num_layers: int) -> list[int] | None:
        """An optional layer index or list of them, each in range."""
        value = self.values.get(key)
        if value is None or value == []:
            return None
        layers = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(layers, list) or not all(_index(x) and 0 <= x < num_layers for x in layers):
            raise self.refuse(f"{key} must be layer indices in 0..{num_layers - 1}, got {short(value)}")
        return layers

    def only_known(self, known: set[str], *, what: str) -> None:
        """Refuse any option outside `known` that is switched on: it would change what the adapter computes."""
        for key, value in self.values.items():
            if key not in known and value not in (None, False, "") and value != [] and value != {}:
                raise self.refuse(f"{what} option {key}={short(value)} is not supported")


def _index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def short(value, limit: int = 200) -> str:
    """repr(value), cut to `limit` characters (a config value can be a megabyte of JSON)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deeply; an int beyond the digits Python prints
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "…"
