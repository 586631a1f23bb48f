"""Stage one, the caches: tiled extraction of backbone features into the Zarr feature
cache, reading it back, and the spectral-spatial context store.

Submodules and their public names load on first use (SPEC 1 lazy loading, as in scikit-image),
so importing one part does not import torch or the rest.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=["cache", "config", "context", "extract"],
    submod_attrs={
        "config": ["DTYPE_NAMES", "FILTERS", "ZOOMS", "ContextConfig", "ExtractConfig"],
        "extract": [
            "ChunkJob",
            "TileLayout",
            "compute_chunk",
            "extract_features",
            "patch_class_labels",
            "resolve_device",
            "resolve_dtype",
        ],
        "cache": [
            "CACHE_FORMAT",
            "FeatureCache",
            "array_path",
            "check_fingerprint",
            "count_reads",
            "create_or_resume",
            "open_store",
            "read_features",
        ],
        "context": [
            "CONTEXT_FORMAT",
            "ContextStore",
            "context_features",
            "context_info",
            "reduce_spectra",
            "verify_context",
            "write_context",
        ],
    },
)
