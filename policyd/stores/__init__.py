"""The store registry: one line per backend, and everything built from it.

The map types ``TYPE:LOCATION`` accepts, the settings' union of map options, the command
line's help and the classes that open each map all come from BACKENDS. A new backend is one
module (its Store subclass with its Options model) and one line here.

Backend modules are imported when the registry is first used; a module must therefore not
import an optional client library at its top, only when a store of its type starts. A missing
optional library is reported as one line naming the package to install (``requires``), and an
ImportError from anything else, a bug in a store module included, is never masked.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from functools import cache
from typing import get_args

from policyd.model import LoadError, Problem
from policyd.stores.base import Store, StoreContext, StoreOptions


@dataclass(frozen=True)
class Backend:
    """A map type: its name, where its Store class lives, and the optional Python packages it
    needs, as {import name: the extra that installs it}."""

    name: str
    target: str  # "module:Class"
    requires: dict[str, str] = field(default_factory=dict)


BACKENDS = (
    Backend("dms", "policyd.stores.dms:DmsStore"),
    Backend("texthash", "policyd.stores.files:TexthashStore"),
    Backend("pcre", "policyd.stores.files:PcreStore"),
    Backend("regexp", "policyd.stores.files:RegexpStore"),
    Backend("ldap", "policyd.stores.ldap:LdapStore", requires={"ldap3": "ldap"}),
    Backend("dms-ldap", "policyd.stores.dms_ldap:DmsLdapStore", requires={"ldap3": "ldap"}),
    Backend(
        "dms-ldap-logins", "policyd.stores.dms_ldap:DmsLdapLoginStore", requires={"ldap3": "ldap"}
    ),
    Backend("pgsql", "policyd.stores.pgsql:PgsqlStore", requires={"asyncpg": "pgsql"}),
    Backend("mysql", "policyd.stores.mysql:MysqlStore", requires={"aiomysql": "mysql"}),
    Backend("sqlite", "policyd.stores.sqlite:SqliteStore"),
)


@cache
def backends() -> dict[str, tuple[Backend, type[Store]]]:
    """Every registered map type with its Store class, in registration order."""
    found: dict[str, tuple[Backend, type[Store]]] = {}
    for backend in BACKENDS:
        module_name, _, class_name = backend.target.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        if not (isinstance(cls, type) and issubclass(cls, Store)):
            raise TypeError(f"{backend.target} is not a Store")
        if get_args(cls.Options.model_fields["type"].annotation) != (backend.name,):
            raise TypeError(f"{backend.target}: Options.type must be Literal[{backend.name!r}]")
        found[backend.name] = (backend, cls)
    return found


def store_class(type_name: str) -> type[Store]:
    return backends()[type_name][1]


def options_models() -> tuple[type[StoreOptions], ...]:
    return tuple(cls.Options for _, cls in backends().values())


def map_types_help() -> str:
    """``dms:DIR, texthash:FILE, ...`` for the command line's help."""
    return ", ".join(f"{name}:{cls.location_help}" for name, (_, cls) in backends().items())


def missing_package(type_name: str) -> str | None:
    """Why a map of this type cannot be opened here: the package to install, or None."""
    backend = backends()[type_name][0]
    for module, extra in backend.requires.items():
        if importlib.util.find_spec(module) is None:
            return (
                f"map type {type_name!r} needs the Python package {module!r}:"
                f" pip install 'policyd[{extra}]'"
            )
    return None


def open_store(options: StoreOptions, context: StoreContext) -> Store:
    """A new, not yet started store for one configured map."""
    missing = missing_package(options.type)
    if missing is not None:
        raise LoadError([Problem(f"{options.type}:", 0, missing)])
    return store_class(options.type).from_options(options, context)


__all__ = [
    "BACKENDS",
    "Backend",
    "Store",
    "StoreContext",
    "StoreOptions",
    "backends",
    "map_types_help",
    "open_store",
    "options_models",
    "store_class",
]
