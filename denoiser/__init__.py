"""The one-step denoising network of ADDPM (its architectures come from preseg's registry)."""

from denoiser.model import (
    DENOISER_CONDS,
    NoisyMaskBatch,
    check_denoiser_matches,
    denoiser_defaults,
    denoiser_in_channels,
    denoiser_input,
    load_denoiser,
    load_final_step,
)

__all__ = [
    "DENOISER_CONDS",
    "NoisyMaskBatch",
    "check_denoiser_matches",
    "denoiser_defaults",
    "denoiser_in_channels",
    "denoiser_input",
    "load_denoiser",
    "load_final_step",
]
