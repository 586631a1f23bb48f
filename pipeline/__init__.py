"""hsicache library, in subpackages that follow the data:

* :mod:`pipeline.scene` — readers, built-in and synthetic scenes, the rendering, splits,
  ``prepare``;
* :mod:`pipeline.backbone` — the frozen diffusion UNet: loading, ADM conversion, pretraining;
* :mod:`pipeline.features` — extraction into the feature cache, and the context store;
* :mod:`pipeline.heads` — the head registry, torch and classic heads, semi-supervised heads,
  training against the caches;
* :mod:`pipeline.evaluation` — metrics, evaluation and maps, ``compare``, ``curve``, ``probe``,
  ``suggest``;
* :mod:`pipeline.io` (outputs, atomic writes, locations, the lock, dask, ``params.yaml``
  sections) and :mod:`pipeline.utils` (argument checks, devices) serve them all;
  :mod:`pipeline.bench` times them.

Each stage that writes a cache has one frozen configuration holding its settings, defaults and
checks (``PrepareConfig``, ``PretrainConfig``, ``ContextConfig``, ``ExtractConfig``, in each
package's ``config`` module); its function takes inputs, outputs and that configuration, and
its errors name the configuration's fields.

The library never prints: progress is reported through the ``rich`` progress object or
callback a caller hands in. Only :mod:`pipeline.io.params` reads ``params.yaml``, for callers
(the commands, ``compare``) that name head recipes by their entry there.
"""

from pipeline.errors import HsicacheError

__all__ = ["HsicacheError", "__version__"]
__version__ = "0.1.0"
