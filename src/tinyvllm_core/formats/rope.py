"""RoPE parameters from config.json (transformers 4's top-level rope_theta / rope_scaling, transformers 5's
rope_parameters) and the rotary frequencies they define, with HF's llama3, linear and yarn scaling."""

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..config import ConfigError, ModelConfig


@dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (HF's rope_type): llama3, linear or yarn (rope_frequencies computes the frequencies)."""

  rope_type: str
  factor: float = 1.0
  original_max_position_embeddings: int | None = None
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  attention_factor: float | None = None  # yarn: scales cos and sin (default 0.1 ln(factor) + 1)
  truncate: bool = True  # yarn: round the correction range to whole dimensions


SCALINGS = ("llama3", "linear", "yarn")
# keys a rope dict may hold that do not change the arithmetic here
_IGNORED = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def rope_from_hf(cfg: dict, path: Path) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from either layout; a field present under one name is never replaced by a default."""
  params = cfg.get("rope_parameters") or {}
  scaling = params if params else cfg.get("rope_scaling") or {}
  theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
  partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ConfigError(f"{path}: partial_rotary_factor {partial} (partial rotary embeddings) is not supported")
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type not in SCALINGS:
    raise ConfigError(f"{path}: rope_type {rope_type!r} is not supported (supported: default, {', '.join(SCALINGS)})")
  known = {f.name for f in fields(RopeScaling)}
  if unknown := sorted(set(scaling) - known - _IGNORED):
    raise ConfigError(f"{path}: rope scaling field {unknown[0]!r} ({rope_type}) is not supported")
  values = {k: v for k, v in scaling.items() if k in known and k != "rope_type" and v is not None}
  return theta, RopeScaling(rope_type, **values)


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
  """(inverse frequencies [head_dim / 2], the factor cos and sin are scaled by)."""
  dim, base = config.head_dim, config.rope_theta
  inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if config.rope_freq_factors is not None:
    inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float64)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq, 1.0
  original = scaling.original_max_position_embeddings or config.max_position_embeddings
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor, 1.0
  if scaling.rope_type == "llama3":
    return _llama3(inv_freq, scaling, original), 1.0
  return _yarn(inv_freq, scaling, original, dim, base)


def _llama3(inv_freq: np.ndarray, s: RopeScaling, original: int) -> np.ndarray:
  """Long wavelengths divided by the factor, short ones kept, a smooth blend between."""
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen, high_freq_wavelen = original / s.low_freq_factor, original / s.high_freq_factor
  smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, blended, scaled)


def _yarn(inv_freq: np.ndarray, s: RopeScaling, original: int, dim: int, base: float) -> tuple[np.ndarray, float]:
  """Interpolated (divided by the factor) below the correction range, extrapolated (kept) above it, a linear ramp
  between; cos and sin scaled by the attention factor."""

  def correction_dim(rotations: float) -> float:
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / max(high - low, 0.001), 0, 1)
  extrapolated = 1 - ramp
  mixed = inv_freq / s.factor * (1 - extrapolated) + inv_freq * extrapolated
  attention_factor = s.attention_factor
  if attention_factor is None:
    attention_factor = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
  return mixed, attention_factor
