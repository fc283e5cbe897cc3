"""Frozen records without ``dataclasses``, for the modules ``lazyfs mount`` imports.

``dataclasses`` imports ``inspect`` (and with it ast, dis and tokenize): 7-10 ms of every start
of a client whose start is its mount time. A record names its fields in ``_FIELDS``, in the
order of its constructor's parameters, and takes them as its ``__slots__``; it compares,
hashes, prints, copies and pickles as a frozen dataclass of those fields would, and refuses
assignment the same way.

A pure leaf: no I/O.
"""

from __future__ import annotations


class Record:
    __slots__ = ()
    _FIELDS: tuple[str, ...] = ()
    # Fields left out of repr (a secret), as dataclasses' field(repr=False).
    _REPR_HIDDEN: frozenset[str] = frozenset()

    def _set(self, name: str, value: object) -> None:
        """For ``__init__`` only: fields cannot be assigned afterwards."""
        object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self._FIELDS
            if name not in self._REPR_HIDDEN
        )
        return f"{type(self).__qualname__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type[Record], tuple[object, ...]]:
        # Through the constructor: the default would set the slots with the refused setattr.
        return (type(self), self._values())
