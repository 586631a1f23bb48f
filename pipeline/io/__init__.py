"""Where outputs go and how they get there: output kinds and the overwrite guard, atomic
publication and provenance, byte-reproducible model files, local/remote locations, the store
lock, the in-memory chunk cache, dask, and reading ``params.yaml`` sections.

Submodules and their public names load on first use (SPEC 1 lazy loading, as in scikit-image),
so importing one part does not import torch or the rest.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=["archive", "cluster", "outputs", "params", "storage", "store"],
    submod_attrs={
        "archive": ["skops_bytes"],
        "outputs": [
            "BACKBONE",
            "COMPARE_METRICS",
            "CONFIDENCE_NPY",
            "CONFUSION_CSV",
            "CONTEXT",
            "CURVE_CSV",
            "CURVE_METRICS",
            "FEATURES",
            "GEOJSON",
            "GEOTIFF",
            "HEAD",
            "MARKDOWN",
            "METRICS",
            "NPY",
            "PNG",
            "PROBE_METRICS",
            "SCENE",
            "SIMULATION_METRICS",
            "SUGGEST_CSV",
            "OutputKind",
            "check_outputs",
            "local_path",
            "mark_npy",
            "png_metadata",
        ],
        "store": [
            "all_or_nothing",
            "as_os_error",
            "atomic_output",
            "describe_codecs",
            "jsonable",
            "package_versions",
            "publish",
            "sha256_arrays",
            "umask_modes",
        ],
        "storage": ["Location", "MemoryCache", "StoreLock", "memory_cache", "publish_folder"],
        "cluster": [
            "as_they_finish",
            "cluster_opener",
            "connected",
            "dask_client",
            "parse_resources",
            "worker_loads",
            "worker_state",
        ],
        "params": ["head_settings", "load_section"],
    },
)
