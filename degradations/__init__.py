"""Physics of portable low-field (0.05-0.5 T) MRI as composable k-space degradations (pure torch).

Conventions: complex images and k-space are `[B, 1, H, W]` complex64; FFTs are centred and orthonormal;
the readout runs along `W` and phase encoding along `H`; every random draw takes a `torch.Generator`.
A measurement (k-space, its operator's parameters and B0 settings, its noise level and that level's origin)
is one `Measurement`, which builds its operator `A` through `build_operator`, as the simulator does.
"""

from .b0 import B0PhaseCorruption, OffResonanceEncoding, random_b0_map
from .blur import GaussianBlur, gaussian_mtf
from .coils import (
    CoilSensitivities,
    birdcage_sensitivities,
    espirit_sensitivities,
    noise_covariance,
    root_sum_of_squares,
    whitening_matrix,
)
from .compose import (
    PARAM_KEYS,
    REGIMES,
    LowFieldDegradation,
    make_regime,
    neutral_params,
    params_to_jsonable,
    regime_label,
)
from .fourier import channels_to_complex, complex_to_channels, fft2c, ifft2c
from .masks import UndersamplingMask, cartesian_mask, poisson_disc_mask
from .measurement import Measurement, NoiseOrigin, build_operator, operator_norm_sq
from .noise import ComplexGaussianNoise
from .noise_estimate import estimate_noise_sigma
from .operator import ForwardOperator
from .snr import foreground_mask, noise_sigma_for_snr, signal_power, snr_db
from .t2star import T2StarDecay, t2star_weights
from .timing import AcquisitionTiming, sample_times_ms

__all__ = [
    "fft2c", "ifft2c", "complex_to_channels", "channels_to_complex",
    "foreground_mask", "signal_power", "snr_db", "noise_sigma_for_snr",
    "GaussianBlur", "gaussian_mtf", "T2StarDecay", "t2star_weights",
    "B0PhaseCorruption", "OffResonanceEncoding",
    "random_b0_map", "ComplexGaussianNoise", "AcquisitionTiming", "sample_times_ms",
    "LowFieldDegradation", "make_regime", "REGIMES", "PARAM_KEYS", "neutral_params", "params_to_jsonable",
    "regime_label",
    "ForwardOperator", "estimate_noise_sigma",
    "Measurement", "NoiseOrigin", "build_operator", "operator_norm_sq",
    "UndersamplingMask", "cartesian_mask", "poisson_disc_mask",
    "CoilSensitivities", "birdcage_sensitivities", "espirit_sensitivities", "noise_covariance",
    "whitening_matrix", "root_sum_of_squares",
]
