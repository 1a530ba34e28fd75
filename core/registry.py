"""Name -> entry registries (training methods, evaluation attacks, models): one entry per name."""
from __future__ import annotations

from typing import Generic, TypeVar

from errors import UserError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """A dict of named entries that refuses a second entry under a name and names the choices."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a name may be registered once."""
        if name in self:
            raise ValueError(f"{self.what} registered twice: {name}")
        self[name] = entry
        return entry

    def choose(self, name: str, flag: str) -> T:
        """The entry ``name``; an unknown name is a ``UserError`` (``FLAG 'x' is not one of: ...``)."""
        if name not in self:
            raise UserError(f"{flag} {name!r} is not one of: {', '.join(self)}")
        return self[name]
