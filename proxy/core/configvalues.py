"""Pure: reading one setting's value, whatever layer it came from (YAML, the environment,
flags). Each parser takes the key it reads, and every error is a :class:`ConfigError` that
names it, in one line: never a traceback. YAML turns unquoted numbers into ints and floats and
``yes`` into True, so each parser says what it expected when the type is wrong."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml


class ConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

# Longer than any timeout or TTL anyone means; larger numbers overflow the event loop's timers.
_SECONDS_MAX: Final = 10 * 365 * 86400.0
_SIZE_MAX: Final = 2**62
_DIGITS: Final = re.compile(r"[0-9]+")


def is_number(value: Any) -> bool:
    # YAML's true/false are ints to Python; a setting that wants a number never means them.
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_text(key: str, value: Any) -> str:
    """A string setting. YAML turns unquoted numbers and lists into other types: say so."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
    return value


def parse_size(key: str, value: Any) -> int:
    if is_number(value):
        value = str(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", parse_text(key, value))
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(key, f"not a size: {value!r} (e.g. 500MiB, 20GiB)")
    size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not size <= _SIZE_MAX:
        raise ConfigError(key, f"too large: {value!r}")
    return int(size)


def parse_seconds(key: str, value: Any) -> float:
    if is_number(value):
        result = float(value)
    else:
        text = parse_text(key, value).strip()
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
        number, unit = text, "s"
        for suffix in ("ms", "s", "m", "h", "d"):
            if text.endswith(suffix):
                number, unit = text[: -len(suffix)], suffix
                break
        if not re.fullmatch(r"\s*[0-9]+(?:\.[0-9]+)?\s*", number):
            raise ConfigError(key, f"not a duration: {value!r} (e.g. 60, 60s, 5m, 2h, 1d)")
        result = float(number) * scale[unit]
    if math.isnan(result) or result < 0:
        raise ConfigError(key, f"must be a number of seconds, 0 or more, got {value!r}")
    if result > _SECONDS_MAX:
        raise ConfigError(key, f"too long: {value!r} (at most 10 years)")
    return result


def parse_ttl(key: str, value: Any) -> float | None:
    """A duration, or ``forever`` (None)."""
    if isinstance(value, str) and value.strip().lower() in ("forever", "never expires"):
        return None
    return parse_seconds(key, value)


def parse_optional_seconds(key: str, value: Any) -> float | None:
    """A duration, or ``never`` / ``off`` (None)."""
    if isinstance(value, str) and value.strip().lower() in ("never", "off", "none"):
        return None
    return parse_seconds(key, value)


def parse_fraction(key: str, value: Any) -> float:
    """``0.9`` or ``90%``: more than 0, at most 1."""
    text = value.strip() if isinstance(value, str) else value
    percent = isinstance(text, str) and text.endswith("%")
    if percent:
        text = text[:-1].strip()
    try:
        result = float(text) if is_number(text) or isinstance(text, str) else math.nan
    except ValueError:
        result = math.nan
    if percent:
        result /= 100
    if not 0 < result <= 1:
        raise ConfigError(key, f"expected a fraction of the budget, like 0.9 or 90%, got {value!r}")
    return result


def parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(key, f"not a boolean: {value!r}")


def parse_int(key: str, value: Any, minimum: int = 0, maximum: int = 1_000_000) -> int:
    """A whole number: an int, or a string of digits (the environment). 1.9 is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()) and len(value.strip()) < 10:
        result = int(value.strip())
    else:
        raise ConfigError(key, f"not a whole number: {value!r}")
    if not minimum <= result <= maximum:
        raise ConfigError(key, f"must be between {minimum} and {maximum}, got {result}")
    return result


def parse_listen(key: str, value: Any) -> tuple[str, int]:
    host, sep, port = parse_text(key, value).rpartition(":")
    if not sep or not _DIGITS.fullmatch(port) or len(port) > 5 or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_path(key: str, value: Any) -> Path:
    text = parse_text(key, value)
    if not text or "\x00" in text:
        # The OS refuses a NUL in a path, with a ValueError at first use: refuse it here.
        raise ConfigError(key, f"not a path: {value!r}")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~someone" for a user the system does not know
        raise ConfigError(key, f"cannot expand {text!r}: no such user's home directory") from None


def load_yaml(key: str, text: str, source: str = "the value") -> Any:
    """A YAML document; nesting too deep for the parser (``[[[[...``) is malformed like any
    other error, not a RecursionError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"{source} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(key, f"{source} is not valid YAML: nested too deeply") from None


def parse_choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def parse_mapping(key: str, value: Any, known: set[str]) -> Mapping[str, Any]:
    if isinstance(value, str):
        # From the environment: a YAML flow mapping, OCICACHE_AUTH='{htpasswd: /etc/htpasswd}'.
        value = load_yaml(key, value)
    if not isinstance(value, Mapping):
        raise ConfigError(key, "expected a mapping")
    unknown = set(map(str, value)) - known
    if unknown:
        raise ConfigError(
            key, f"unknown keys: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
        )
    return value


def parse_names(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not value:
        raise ConfigError(key, "expected a non-empty list")
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, "expected a list of names")
    return tuple(value)


def read_setting_file(key: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
