"""Stage two, measured: metrics, evaluation and maps, ``compare`` over split seeds,
label-efficiency curves, the layer probe and the next pixels to label.

Submodules and their public names load on first use (SPEC 1 lazy loading, as in scikit-image),
so importing one part does not import torch or the rest.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=["compare", "curve", "metrics", "probing", "scoring", "suggest"],
    submod_attrs={
        "metrics": [
            "classification_metrics",
            "confusion_matrix",
            "plot_confusion",
            "summarise_seeds",
            "write_confusion_csv",
        ],
        "scoring": [
            "check_recipe",
            "evaluate",
            "evaluate_seeds",
            "predict_map",
            "protocol_card",
            "refit_over_seeds",
            "resplit",
            "split_note",
            "warn_split",
            "write_evaluation",
        ],
        "compare": [
            "COMPARE_KEYS",
            "compare_heads",
            "head_recipe",
            "markdown_table",
            "paired_difference",
            "plot_comparison",
            "run_comparison",
            "twin_without",
        ],
        "curve": ["CURVE_KEYS", "label_curve", "plot_curve", "run_curve"],
        "probing": [
            "PROBE_KEYS",
            "Candidate",
            "as_entry",
            "as_flags",
            "candidates",
            "probe",
            "recommend",
            "run_probe",
        ],
        "suggest": [
            "choose",
            "pixel_coordinates",
            "run_simulation",
            "run_suggest",
            "simulate",
            "suggest_pixels",
        ],
    },
)
