"""Exception types of hsicache.

Every exception a user can cause derives from :class:`HsicacheError` *and* from the built-in
exception it refines, so callers may catch either. The CLI turns any :class:`HsicacheError` into
one line on stderr and exit code 2.
"""

from __future__ import annotations


class HsicacheError(Exception):
    """Base class of every error a user of hsicache can cause and fix."""


class SceneNotFoundError(HsicacheError, FileNotFoundError):
    """A file or store that was named does not exist."""

    def __str__(self) -> str:  # FileNotFoundError formats args oddly; keep our message
        return str(self.args[0]) if self.args else ""


class SceneFormatError(HsicacheError, ValueError):
    """A file exists but cannot be read as what it was given as (corrupt, unknown format)."""


class KeyAmbiguityError(HsicacheError, KeyError):
    """A container file (.mat/.npz/.h5) holds zero or several candidate arrays and no key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(HsicacheError, ValueError):
    """Two arrays that must agree in shape do not."""


class LabelError(HsicacheError, ValueError):
    """A label map or mask holds values a label map cannot hold."""


class NonFiniteError(HsicacheError, ValueError):
    """The cube holds NaN or infinite values and no fill policy was chosen."""


class BandMismatchError(HsicacheError, ValueError):
    """A band index or wavelength does not exist in the cube."""


class SplitError(HsicacheError, ValueError):
    """A train/test split cannot be made as asked."""


class StoreError(HsicacheError, ValueError):
    """A hsicache store is incomplete, of another version, or not the one the caller expects."""


class ConfigError(HsicacheError, ValueError):
    """A parameter (option or ``params.yaml`` key) has a value it cannot have."""


class OutputConflictError(HsicacheError, FileExistsError):
    """An output path holds something hsicache did not write, or lies on one of the inputs."""

    def __str__(self) -> str:  # FileExistsError formats args oddly; keep our message
        return str(self.args[0]) if self.args else ""


class HsicacheWarning(UserWarning):
    """Something a user should know about that does not stop the run (a constant band...)."""
