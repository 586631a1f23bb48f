"""hsicache library: scene readers, splits, renderings, the feature cache and heads.

The library never reads ``params.yaml`` and never prints: progress is reported through the
``rich`` progress object or callback a caller hands in.
"""

from pipeline.errors import HsicacheError

__all__ = ["HsicacheError", "__version__"]
__version__ = "0.1.0"
