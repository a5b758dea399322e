"""Reading the YAML files a user writes (configs, task files): safely (no Python tags), bounded
in size, a key given twice refused, every error one line naming the file."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, short

MAX_CONFIG_BYTES = 1 << 20  # configs and task files are a few hundred bytes; this bounds a YAML bomb


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the base loader reports unhashable keys
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {short(key)} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file read safely (no Python tags), bounded in size, duplicate keys refused; errors
    name the file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a t2tune YAML file")
    try:
        return yaml.load(raw.decode("utf-8-sig"), Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:200]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
