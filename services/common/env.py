"""Typed, validated reads of FANOUT_* environment variables; a bad value names its variable."""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping, Sequence


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


class Env:
    """Reads settings from an environment mapping, failing fast with a message naming the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: builtins.str) -> builtins.str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def str(
        self, name: builtins.str, default: builtins.str, pattern: builtins.str | None = None
    ) -> builtins.str:
        value = self.raw(name)
        if value is None:
            return default
        if pattern is not None and not re.fullmatch(pattern, value):
            raise ConfigError(f"{name}={value!r} does not match {pattern}")
        return value

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> builtins.int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not an integer") from None
        _check_range(name, number, minimum, maximum)
        return number

    def float(
        self,
        name: builtins.str,
        default: builtins.float,
        minimum: builtins.float | None = None,
        maximum: builtins.float | None = None,
    ) -> builtins.float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a number") from None
        if number != number:  # NaN
            raise ConfigError(f"{name}={value!r} is not a number")
        _check_range(name, number, minimum, maximum)
        return number

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean (use true or false)")

    def choice(
        self, name: builtins.str, default: builtins.str, choices: Sequence[builtins.str]
    ) -> builtins.str:
        value = self.raw(name)
        if value is None:
            return default
        if value not in choices:
            raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
        return value

    def list(self, name: builtins.str) -> builtins.list[builtins.str]:
        value = self.raw(name)
        if value is None:
            return []
        return [item.strip() for item in value.split(",") if item.strip()]


def _check_range(name: str, number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name}={number} is above the maximum {maximum}")
