"""Shared helpers: argument checks that name the parameter, the stages" configuration
base class, torch devices and dtypes, whole-cube statistics in bounded memory.

Submodules and their public names load on first use (SPEC 1 lazy loading, as in scikit-image),
so importing one part does not import torch or the rest.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=["arrays", "checks", "config", "devices"],
    submod_attrs={
        "arrays": ["column_moments", "pixels_where_all"],
        "checks": [
            "check_choice",
            "check_int",
            "check_number",
            "check_seed",
            "check_seeds",
            "counted",
        ],
        "config": ["StageConfig"],
        "devices": ["DTYPES", "cpu_capability", "resolve_device", "resolve_dtype", "usable_cores"],
    },
)
