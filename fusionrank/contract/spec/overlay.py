"""Spec overlays: a spec file that names a `base:` holds only the values it changes.

    base: default            # the spec shipped with the package; or a path, relative to this file
    train: {epochs: 2}       # every other train field keeps the base's value

The overlay is merged over the base's full data (every field, defaults included) before the spec is built, so the
result is checked like any spec. Rules:
- a section (a nested spec object such as `train`, `modalities.image`) merges key by key, recursively;
- every other value replaces the base's whole value: scalars, lists (`buckets: [16, 32]` is the new list, not an
  addition) and free-form mappings keyed by name (`export.cpu.precision: {}` leaves no model quantized);
- a key that is not a field of the base spec is an error naming its path and the known keys there;
- a base may itself be an overlay; a circle of bases is an error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

from fusionrank.contract.errors import SpecError
from fusionrank.contract.spec.base import fail, to_dict
from fusionrank.contract.spec.pipeline import PipelineSpec

BASE_KEY = "base"
DEFAULT_BASE = "default"  # the packaged spec, whatever project the overlay is read in


def _section_type(tp) -> type | None:
    """The spec section class a field holds (also through `X | None`), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def merge_overlay(base: dict, overlay: dict, cls: type = PipelineSpec, path: str = "") -> dict:
    """`base` (the plain data of a `cls` spec object) with `overlay`'s values merged in by the rules above."""
    if not isinstance(overlay, dict):
        fail(path or "<root>", overlay, "a mapping")
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name != "source")
    merged = dict(base)
    for key, value in overlay.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            fail(where, value, "a key of the base spec (an overlay changes values, it adds none); known keys here: "
                 + ", ".join(known))
        section = _section_type(hints[key])
        if section is not None and isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge_overlay(base[key], value, section, where)
        else:
            merged[key] = value
    return merged


def base_path(name: object, overlay_file: Path, packaged: Path) -> Path:
    """The spec file a `base:` value names: `default` is the packaged spec, anything else a path (relative to the
    overlay's own folder)."""
    if not isinstance(name, str) or not name:
        fail(BASE_KEY, name, f"'{DEFAULT_BASE}' (the packaged spec) or the path of a spec file")
    if name == DEFAULT_BASE:
        return packaged
    path = Path(name)
    return path if path.is_absolute() else overlay_file.parent / path


def apply_overlay(data: dict, overlay_file: Path, packaged: Path, read: typing.Callable[[Path], dict],
                  build: typing.Callable[[dict, str], PipelineSpec], seen: tuple[Path, ...] = ()) -> dict:
    """The full spec data of the overlay `data` read from `overlay_file`: its base's data (itself resolved when it
    is an overlay) with `data` merged in. `read` parses a spec file, `build` checks data into a spec."""
    data = dict(data)
    base_file = base_path(data.pop(BASE_KEY), overlay_file, packaged).resolve()
    chain = (*seen, overlay_file.resolve())
    if base_file in chain:
        raise SpecError(BASE_KEY, str(base_file), "a spec that is not already a base of this overlay (bases form a "
                        "circle: " + " -> ".join(str(p) for p in (*chain, base_file)) + ")")
    base_data = read(base_file)
    if isinstance(base_data, dict) and BASE_KEY in base_data:
        base_data = apply_overlay(base_data, base_file, packaged, read, build, chain)
    base_spec = build(base_data, str(base_file))  # the base must be a valid spec on its own
    return merge_overlay(to_dict(base_spec, drop=("source",)), data)
