"""The store registry: map type name -> implementing class, imported only when used.

Lazy imports keep optional backends optional: a store whose extra is not installed fails only
when a map of its type is configured, with an error naming the missing package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from policyd.stores.base import Hit, Store, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from policyd.config import MapConfig, Settings

STORES = {
    "dms": "policyd.stores.dms:DmsStore",
    "texthash": "policyd.stores.files:TexthashStore",
    "pcre": "policyd.stores.files:PcreStore",
    "regexp": "policyd.stores.files:RegexpStore",
}


def store_class(type_name: str) -> type[Store]:
    """The class registered for ``type_name``; ImportError names the missing dependency."""
    module_name, _, class_name = STORES[type_name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"map type {type_name!r} needs {error.name!r}: pip install 'policyd[{type_name}]'"
        ) from error
    cls: type[Store] = getattr(module, class_name)
    return cls


def open_store(spec: MapConfig, settings: Settings) -> Store:
    """A new, not yet started store for one configured map."""
    return store_class(spec.type).from_config(spec, settings)


__all__ = ["STORES", "Hit", "Store", "StoreError", "StoreUnavailable", "open_store", "store_class"]
