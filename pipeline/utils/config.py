"""One frozen configuration per stage: the single source of a stage's defaults and checks.

A stage's configuration is a frozen dataclass deriving from :class:`StageConfig` (the model
is diffusers' ``ConfigMixin``): its fields are the stage's settings with their defaults, its
``_check`` refuses a bad value when the configuration is made, naming the *field*, and it is
made the same way from a ``params.yaml`` section (:meth:`StageConfig.from_mapping`), from
keyword arguments, or from the command line, whose options default to ``None`` ("not given")
and map onto the fields (:meth:`StageConfig.from_given`). The command line turns field names
in an error into its flags in one place (``stages/_errors.py``), so a notebook user of the
library is told about ``stride``, a shell user about ``stride``.

Lists become tuples, so a configuration is hashable and cannot change after its checks; a
single value given for a tuple field is a tuple of one (``sites="up1.res1"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pipeline.errors import ConfigError

__all__ = ["StageConfig"]

_C = TypeVar("_C", bound="StageConfig")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of the stages' configurations (see the module docstring).

    Subclasses are ``@dataclass(frozen=True)``, set :attr:`section` (the ``params.yaml``
    section and stage name used in messages) and override :meth:`_check`.
    """

    section: ClassVar[str] = "stage"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            elif isinstance(f.default, tuple) and not isinstance(value, tuple):
                object.__setattr__(self, f.name, (value,))  # one site, one timestep
        self._check()

    def _check(self) -> None:
        """Refuse a value a field cannot have (a :class:`ConfigError` naming the field)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The settings, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``."""
        return {f.name: f.default for f in dataclasses.fields(cls)}[name]

    @classmethod
    def _refuse_unknown(cls, names: Any) -> None:
        unknown = sorted(set(names) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown {cls.section} setting `{unknown[0]}`; known: "
                + ", ".join(cls.field_names())
            )

    @classmethod
    def from_mapping(cls: type[_C], values: Mapping[str, Any]) -> _C:
        """A configuration from a mapping such as a ``params.yaml`` section: unknown keys are
        refused, ``None`` means the default."""
        cls._refuse_unknown(values)
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_given(cls: type[_C], given: Mapping[str, Any]) -> _C:
        """A configuration from the command line's options: those not given (``None``) keep
        the default; names that are not fields (inputs, outputs) are skipped."""
        names = set(cls.field_names())
        return cls(**{k: v for k, v in given.items() if k in names and v is not None})

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` (checked like a new configuration)."""
        self._refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON types (tuples become lists)."""
        return {
            name: list(v) if isinstance(v, tuple) else v
            for name, v in ((n, getattr(self, n)) for n in self.field_names())
        }
