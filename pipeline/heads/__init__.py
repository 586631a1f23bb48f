"""Stage two: the head registry, the torch heads (FiLM, MLP), building and fitting any
head, the semi-supervised heads, choosing a head's settings on the train pixels, and
training/saving/loading a head against the caches.

Submodules and their public names load on first use (SPEC 1 lazy loading, as in scikit-image),
so importing one part does not import torch or the rest.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=["build", "neural", "registry", "select", "semisupervised", "training"],
    submod_attrs={
        "registry": [
            "FEATURE_MODES",
            "HEADS",
            "REGISTRY",
            "HeadSpec",
            "check_kind",
            "head_help",
            "register",
        ],
        "neural": ["FiLMClassifier", "MLPHead"],
        "build": ["check_params", "fit_estimator", "make_head", "require_probabilities"],
        "semisupervised": [
            "EXACT_LIMIT",
            "SELF_TRAINING_KEYS",
            "NeighbourIndex",
            "PropagationHead",
            "check_self_training",
            "self_training",
        ],
        "select": ["TrainCVSelect", "candidate_grid", "check_select"],
        "training": [
            "HEAD_FORMAT",
            "FeatureSelection",
            "Inputs",
            "Recipe",
            "TrainedHead",
            "assemble",
            "build_head",
            "fit_head",
            "fit_rows",
            "load_head",
            "open_inputs",
            "split_recipe",
            "train_head",
            "unwrap",
        ],
    },
)
