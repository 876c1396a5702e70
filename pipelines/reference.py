"""The device reference list: which balloon and cement products an extract may name.

The list is data (``reference/devices.yaml``: name, manufacturer, model, kind ``balloon`` or
``cement``) with a second file of other spellings (``reference/device_aliases.yaml``). The
procedures suite names both files in ``meta.product_reference`` (paths relative to the
suite), so the reference travels with the suite that checks it: validation maps aliases to
reference names and hands the allowed names to the suite as expectation parameters; the
device charts and the Yellow Card export read manufacturer and model from the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import yaml

from pipelines.errors import ConfigError

PRODUCT_KINDS = ("balloon", "cement")
# Procedure column -> the product kind it must name.
PRODUCT_COLUMNS = {"balloon_product": "balloon", "cement_product": "cement"}


class DeviceReferenceError(ConfigError):
    """The device reference files are missing or malformed (exit code 3)."""


@dataclass(frozen=True)
class Product:
    """One product of the reference list."""

    name: str
    manufacturer: str
    model: str
    kind: str


@dataclass(frozen=True)
class ProductReference:
    """The reference products and the alias map (upper-cased spelling -> reference name)."""

    products: dict[str, Product]
    lookup: dict[str, str]
    version: str

    def names(self, kind: str) -> list[str]:
        """Return the reference names of ``kind`` (``balloon`` or ``cement``), sorted."""
        return sorted(name for name, product in self.products.items() if product.kind == kind)

    def canonical(self, spelling: str | None) -> str | None:
        """Return the reference name for ``spelling`` (case-insensitive), or None if unknown."""
        if spelling is None:
            return None
        return self.lookup.get(spelling.strip().upper())

    def canonicalise(self, column: pd.Series) -> pd.Series:
        """Map known spellings to reference names; unknown values are kept (the suite rejects them)."""
        mapped = column.str.upper().map(self.lookup)
        return mapped.where(mapped.notna(), column)


def _mapping(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DeviceReferenceError(f"device reference {path}: cannot be read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise DeviceReferenceError(f"device reference {path}: not valid YAML") from exc
    if not isinstance(data, dict):
        raise DeviceReferenceError(f"device reference {path}: must be a mapping")
    return data


@lru_cache(maxsize=8)
def load_reference(devices_path: Path, aliases_path: Path) -> ProductReference:
    """Read and check the reference list and its aliases."""
    data = _mapping(devices_path)
    products: dict[str, Product] = {}
    for index, item in enumerate(data.get("products") or []):
        where = f"device reference {devices_path.name}: products[{index}]"
        if not isinstance(item, dict) or not all(
            isinstance(item.get(key), str) and item[key].strip()
            for key in ("name", "manufacturer", "model", "kind")
        ):
            raise DeviceReferenceError(f"{where} needs name, manufacturer, model and kind")
        if item["kind"] not in PRODUCT_KINDS:
            raise DeviceReferenceError(f"{where}: kind {item['kind']!r} is not one of {PRODUCT_KINDS}")
        name = item["name"].strip()
        if name.upper() in {existing.upper() for existing in products}:
            raise DeviceReferenceError(f"{where}: duplicate product {name!r}")
        products[name] = Product(name, item["manufacturer"].strip(), item["model"].strip(),
                                 item["kind"])
    if not products:
        raise DeviceReferenceError(f"device reference {devices_path.name}: no products")
    lookup = {name.upper(): name for name in products}
    aliases = _mapping(aliases_path).get("aliases") or {}
    if not isinstance(aliases, dict):
        raise DeviceReferenceError(f"device aliases {aliases_path.name}: aliases must be a mapping")
    for alias, target in aliases.items():
        if target not in products:
            raise DeviceReferenceError(
                f"device aliases {aliases_path.name}: {alias!r} maps to {target!r}, "
                "which is not in the reference list"
            )
        key = str(alias).strip().upper()
        if key in lookup and lookup[key] != target:
            raise DeviceReferenceError(f"device aliases {aliases_path.name}: {alias!r} is ambiguous")
        lookup[key] = target
    return ProductReference(products=products, lookup=lookup, version=str(data.get("version", "")))


@lru_cache(maxsize=8)
def _suite_reference_paths(expectations_dir: str) -> tuple[Path, Path] | None:
    suite_path = Path(expectations_dir) / "procedures.json"
    with suite_path.open(encoding="utf-8") as handle:
        meta = json.load(handle).get("meta", {})
    files = meta.get("product_reference")
    if not files:
        return None
    return ((suite_path.parent / files["devices"]).resolve(),
            (suite_path.parent / files["aliases"]).resolve())


def reference_for(expectations_dir: Path) -> ProductReference | None:
    """Return the reference named by the procedures suite in ``expectations_dir`` (None if none)."""
    paths = _suite_reference_paths(str(expectations_dir))
    return load_reference(*paths) if paths else None


def product_parameters(checked: pd.DataFrame, kind: str, expectations_dir: Path) -> dict:
    """Map product aliases in ``checked`` in place; return the suite's product parameters.

    Returns ``{"balloon_products": [...], "cement_products": [...]}`` for procedures (the
    value sets of the ``unknown_product`` expectations), nothing for other kinds.
    """
    if kind != "procedures":
        return {}
    reference = reference_for(expectations_dir)
    if reference is None:
        return {}
    for column in PRODUCT_COLUMNS:
        if column in checked:
            checked[column] = reference.canonicalise(checked[column])
    return {f"{product_kind}_products": reference.names(product_kind)
            for product_kind in PRODUCT_KINDS}
