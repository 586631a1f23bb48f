"""Stage one, first step: a scene. Readers (.mat, ENVI, GeoTIFF), the built-in and
synthetic scenes, the 3-band rendering, split protocols, and ``prepare``, which
writes the scene store every later stage reads.

Submodules and their public names load on first use (SPEC 1 lazy loading, as in scikit-image),
so importing one part does not import torch or the rest.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=[
        "builtin",
        "config",
        "core",
        "plots",
        "preparation",
        "readers",
        "render",
        "splits",
        "synthetic",
    ],
    submod_attrs={
        "core": [
            "SCENE_FORMAT",
            "Scene",
            "image_fingerprint",
            "open_scene",
            "read_region",
            "scene_array",
            "scene_fingerprint",
            "write_scene",
        ],
        "readers": ["ENVI_DATA_SUFFIXES", "Raster", "read_cube", "read_map"],
        "builtin": [
            "BUILTIN_SCENES",
            "INDIAN_PINES_ATTRIBUTION",
            "INDIAN_PINES_CLASSES",
            "BuiltinScene",
            "load_builtin",
        ],
        "synthetic": ["SyntheticScene", "make_synthetic_scene"],
        "render": [
            "RGB_MODES",
            "TARGET_WAVELENGTHS_NM",
            "Rendering",
            "check_rendering_options",
            "render_rgb",
        ],
        "splits": ["SPLIT_PROTOCOLS", "check_split_options", "encode_labels", "make_split"],
        "config": ["NAN_POLICIES", "PrepareConfig"],
        "preparation": ["build_scene", "prepare"],
        "plots": ["class_colors", "plot_scene_preview", "save_png"],
    },
)
