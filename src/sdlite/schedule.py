"""Noise schedules of SD v1: alphas_cumprod, timestep spacings and sigma schedules.

Conventions: `t` indexes the 1000-entry training table (t = 0 is the least noisy);
sigma(t) = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]) is the noise level in
k-diffusion's "VE" scaling (x_ve = x_vp / sqrt(alphas_cumprod)). Sigma schedules run from
high to low noise and carry one extra final entry (0, or sigma(0) for DDIM/PLMS).

Where the references disagree (all measured in tests/test_samplers.py):
- alphas_cumprod: CompVis computes betas and their cumulative product in float64 and stores
  the float32 rounding (the `alphas_cumprod` buffer of SD checkpoints); diffusers does it all
  in float32. The two float32 tables differ in 986 of 1000 entries, by up to 4.8e-7 absolute
  (1e-4 relative at t = 999). We follow CompVis (= the checkpoints, = k-diffusion/A1111).
- Fractional timesteps: diffusers' Euler/Heun schedulers interpolate sigma *linearly* in t
  (np.interp); k-diffusion interpolates *log* sigma. At the same t they differ by up to 7e-5
  relative (50 steps). Both feed the same fractional t to the UNet.
"""

from __future__ import annotations

import math

import torch

from .errors import InputError

NUM_TRAIN_STEPS = 1000
INTERPOLATIONS = ("log", "linear", "log_rounded")


def alphas_cumprod(num_train_steps: int = NUM_TRAIN_STEPS, beta_start: float = 0.00085,
                   beta_end: float = 0.012) -> torch.Tensor:
    """SD v1 "scaled linear" alphas_cumprod, float32, identical to the CompVis checkpoint buffer."""
    # float64 like CompVis' make_beta_schedule + np.cumprod; rounding to float32 only at the end
    # reproduces the buffer stored in SD checkpoints bit for bit.
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def discrete_sigmas(table: torch.Tensor | None = None) -> torch.Tensor:
    """sigma(t) for every training timestep (ascending in t), float32 like diffusers/k-diffusion."""
    ac = alphas_cumprod() if table is None else table.detach().to("cpu", torch.float32)
    return ((1 - ac) / ac) ** 0.5


def check_steps(steps: int, num_train_steps: int = NUM_TRAIN_STEPS) -> int:
    """Validate a step count (1..num_train_steps) and return it."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InputError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= num_train_steps:
        raise InputError(f"steps must be between 1 and {num_train_steps}, got {steps}")
    return steps


def leading_timesteps(steps: int, num_train_steps: int = NUM_TRAIN_STEPS,
                      steps_offset: int = 1) -> torch.Tensor:
    """diffusers' "leading" spacing with steps_offset=1, descending: (arange(n) * (T // n) + 1)."""
    # This equals CompVis' make_ddim_timesteps (range(0, T, T // n) + 1) whenever n divides T.
    # Otherwise CompVis yields len(range(0, T, T // n)) timesteps instead of n: 3 steps give
    # [1, 334, 667, 1000] and index past the 1000-entry table, 6 steps run 7, 7 steps run 8.
    # We always run exactly n steps, as diffusers does.
    check_steps(steps, num_train_steps)
    ratio = num_train_steps // steps
    if (steps - 1) * ratio + steps_offset >= num_train_steps:  # the offset pushes past the table
        raise InputError(f"{steps} steps is too many for DDIM/PLMS (at most {num_train_steps - steps_offset})")
    return (torch.arange(steps, dtype=torch.int64) * ratio + steps_offset).flip(0)


def linspace_timesteps(steps: int, num_train_steps: int = NUM_TRAIN_STEPS) -> torch.Tensor:
    """Evenly spaced fractional timesteps from T-1 down to 0 (float32), as k-diffusion and diffusers."""
    # diffusers builds np.linspace(0, T-1, n)[::-1], which for n = 1 is [0]: a single step that
    # starts from the *least* noisy level. k-diffusion gives [T-1]; we follow k-diffusion there.
    check_steps(steps, num_train_steps)
    if steps == 1:
        return torch.tensor([num_train_steps - 1.0])
    return _numpy_linspace(num_train_steps - 1, steps).to(torch.float32).flip(0)


def dpm_solver_timesteps(steps: int, num_train_steps: int = NUM_TRAIN_STEPS) -> torch.Tensor:
    """diffusers DPMSolverMultistep's "linspace" spacing: round(linspace(0, T-1, n+1)), top n, descending."""
    # Unlike the Euler family this lands on integer (table) timesteps and stops at about
    # T / n instead of 0, before the final jump to sigma = 0.
    check_steps(steps, num_train_steps)
    t = _numpy_linspace(num_train_steps - 1, steps + 1).round()
    return t.flip(0)[:-1].to(torch.int64)


def _numpy_linspace(stop: float, num: int) -> torch.Tensor:
    # np.linspace(0, stop, num) in float64, computed the way numpy does (arange * step, exact end)
    # so that the rounding of e.g. 499.5 matches diffusers bit for bit.
    t = torch.arange(num, dtype=torch.float64) * (stop / (num - 1))
    t[-1] = stop
    return t


def sigmas_at(timesteps: torch.Tensor, table: torch.Tensor, interpolation: str = "linear") -> torch.Tensor:
    """sigma at fractional timesteps, interpolated in sigma (diffusers) or log sigma (k-diffusion)."""
    t = timesteps.to(torch.float64)
    lo = t.floor().long().clamp(0, len(table) - 2)
    w = t - lo
    s = table.to(torch.float64)
    if interpolation == "log":
        s = s.log()
    value = s[lo] + w * (s[lo + 1] - s[lo])
    value = value.exp() if interpolation == "log" else value
    return value.to(torch.float32)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (eq. 5) noise levels, sigma_max down to sigma_min, without the final 0."""
    # float64 ramp like diffusers (k-diffusion uses float32; the two differ by ~1e-7 relative).
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).to(torch.float32)


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Append the final sigma = 0 (the clean sample) to a schedule."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def ddim_sigmas(steps: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmas at the leading timesteps for DDIM/PLMS, ending at sigma(t=0), not at 0."""
    # CompVis (and diffusers with set_alpha_to_one=False) use alphas_cumprod[0] as the
    # "previous alpha" of the last step, so sampling stops at noise level sigma(0) ~ 0.029.
    sig = discrete_sigmas(table)
    return torch.cat([sig[leading_timesteps(steps, len(sig))], sig[:1]])


def sigma_to_t(sigma: torch.Tensor, table: torch.Tensor, interpolation: str = "log") -> torch.Tensor:
    """Timestep (float64, same shape) for noise levels; exact integers for table sigmas.

    interpolation: "log" inverts k-diffusion's log-sigma interpolation (also what diffusers uses
    for Karras sigmas), "linear" inverts diffusers' np.interp of sigma (its default Euler/Heun
    schedules), "log_rounded" rounds the "log" result (diffusers DPMSolverMultistep with Karras).
    """
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"unknown timestep interpolation {interpolation!r}; "
                         f"use one of {', '.join(INTERPOLATIONS)}")
    s = sigma.detach().to("cpu", torch.float64).reshape(-1)
    tab = table.detach().to("cpu", torch.float64)
    hi = torch.searchsorted(tab, s).clamp(1, len(tab) - 1)
    lo = hi - 1
    if interpolation == "linear":
        w = (s - tab[lo]) / (tab[hi] - tab[lo])
    else:
        w = (s.log() - tab[lo].log()) / (tab[hi].log() - tab[lo].log())
    t = lo + w.clamp(0, 1)
    if interpolation == "log_rounded":
        t = t.round()
    # Snap sigmas that are table entries to their exact integer timestep: adjacent table sigmas
    # are >= 0.5 % apart, so a 1e-6 relative tolerance cannot pick a wrong neighbour.
    nearest = (tab[None, :] - s[:, None]).abs().argmin(dim=1)
    exact = (tab[nearest] - s).abs() <= 1e-6 * s
    t = torch.where(exact, nearest.to(torch.float64), t)
    return t.reshape(sigma.shape)


def to_vp(x: torch.Tensor, sigma) -> torch.Tensor:
    """VE latents at noise level sigma -> VP latents (what the VAE decodes): x / sqrt(1 + sigma^2)."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


def to_ve(x: torch.Tensor, sigma) -> torch.Tensor:
    """VP latents at noise level sigma -> VE latents: x * sqrt(1 + sigma^2)."""
    return x * math.sqrt(1.0 + float(sigma) ** 2)
