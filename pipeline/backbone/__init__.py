"""Stage one, the frozen model: loading diffusion UNets (diffusers folders, hub ids,
ADM checkpoints, the shipped ``builtin:`` backbones) and their feature sites,
pretraining hsicache's own, and the CPU dtype autotune.

Submodules and their public names load on first use (SPEC 1 lazy loading, as in scikit-image),
so importing one part does not import torch or the rest.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=["adm", "autotune", "config", "loading", "pretraining"],
    submod_attrs={
        "loading": [
            "BUILTIN_BACKBONES",
            "Backbone",
            "Site",
            "check_timesteps",
            "load_backbone",
            "noised",
            "seeded_noise",
            "shipped_backbones",
        ],
        "adm": ["ADM_PRESETS", "AdmArchitecture", "convert_adm_state_dict", "load_adm_checkpoint"],
        "config": ["PretrainConfig"],
        "pretraining": ["BUILTIN_PHOTOS", "load_photos", "pretrain"],
        "autotune": [
            "BF16_TOLERANCE",
            "choose_cpu_dtype",
            "provenance_of",
            "time_call",
            "without_memory",
        ],
    },
)
