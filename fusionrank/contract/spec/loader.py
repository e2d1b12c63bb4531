"""Reading `pipeline.yaml`: the one place the file is parsed, into a validated `PipelineSpec`.

Every field is converted by its type annotation (enums, tuples, nested sections); an unknown field or a wrong
type raises `SpecError` naming the field, the value and what is allowed. A file with a top-level `base:` key is an
overlay holding only the values it changes, merged over its base (`fusionrank.contract.spec.overlay`).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path

import yaml

from fusionrank.contract.errors import SpecError
from fusionrank.contract.project import default_spec_path, packaged_spec_path
from fusionrank.contract.spec.base import fail
from fusionrank.contract.spec.overlay import BASE_KEY, apply_overlay
from fusionrank.contract.spec.pipeline import PipelineSpec

_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert_scalar(tp, value, path: str):
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        fail(path, value, _SCALARS[tp])
    return value


def _convert(tp, value, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            fail(path, value, "one of " + ", ".join(repr(m.value) for m in tp))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail(path, value, "a list")
        return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            fail(path, value, "a mapping")
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp in _SCALARS:
        return _convert_scalar(tp, value, path)
    raise TypeError(f"spec field {path}: unsupported type {tp}")


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(path or "<root>", data, "a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        fail(where, data[unknown[0]], "no such field; known fields: " + ", ".join(sorted(known)))
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict, source: str = "<dict>") -> PipelineSpec:
    """Build and validate a spec from plain data (as parsed from YAML)."""
    data = dict(data or {})
    data.pop("source", None)
    spec = _build(PipelineSpec, data, "")
    return dataclasses.replace(spec, source=source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path):
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError("<file>", str(path), f"a readable YAML file ({exc.strerror})") from exc
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise SpecError("<file>", str(path), f"valid YAML ({exc})") from exc


def load_spec(path: str | Path | None = None) -> PipelineSpec:
    """Read a spec file (default: the project's `pipeline.yaml`, else the packaged one) into a `PipelineSpec`; a file
    naming a `base:` is an overlay merged over that base."""
    path = Path(path) if path else default_spec_path()
    data = _read_yaml(path)
    if isinstance(data, dict) and BASE_KEY in data:
        data = apply_overlay(data, path, packaged_spec_path(), _read_yaml, lambda d, src: from_dict(d, source=src))
    return from_dict(data, source=str(path))
