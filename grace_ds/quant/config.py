"""The quantisation config: one frozen dataclass that describes the whole transform.

It is what `prepare_qat` reads and what the exported checkpoint records
(`config.json["grace_quantization"]`), so a trained model can be rebuilt from its metadata alone.
Defaults follow grace-method.md section 4.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

SUPPORTED_BITS = (4, 8)


def check_bits_group(bits: int, group_size: int) -> None:
    """Shared validation of the two arguments every quantiser entry point takes."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported: use 4 (INT4) or 8 (INT8); "
            f"the symmetric grid is [-2^(b-1), 2^(b-1)-1]"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(
            f"group_size={group_size!r} must be a positive int (128 is the default; a size that "
            f"does not divide in_features falls back to one group per row)"
        )


def qmin_qmax(bits: int) -> tuple[int, int]:
    """(q_n, q_p) of the symmetric signed grid, e.g. (-8, 7) for 4 bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4                      # 4 or 8, symmetric signed grid [-2^(b-1), 2^(b-1)-1]
    group_size: int = 128              # weights per scale along in_features; if it does not divide
                                       # in_features the layer gets one group per row
    init_candidates: int = 20          # scale-init grid search: candidates linspace(*init_range) * max|W|/Q_p
    init_range: tuple[float, float] = (0.3, 1.2)   # multiples of max|W|/Q_p, both > 0
    lsq_grad_scale: bool = False       # scale the log-scale gradient by 1/sqrt(g * Q_p) (LLaVA variant)
    log_scale_clamp: tuple[float, float] | None = None   # (lo, hi) on theta = ln(scale), None = no clamp
    include: tuple[str, ...] = (r"language_model\.(model\.)?layers\.\d+\.",)   # regex (re.search) on module names
    exclude: tuple[str, ...] = (r"visual", r"vision_tower", r"multi_modal_projector", r"merger", r"lm_head", r"embed")
    scale_lr_mult: float = 10.0        # lr of the scale group = scale_lr_mult * lr (paper 10x; scripts 20x, 0.1x)

    def __post_init__(self):
        check_bits_group(self.bits, self.group_size)
        if isinstance(self.init_candidates, bool) or not isinstance(self.init_candidates, int) \
                or self.init_candidates < 1:
            raise ValueError(f"init_candidates={self.init_candidates!r} must be an int >= 1 (default 20)")
        # Lists arrive from YAML/JSON; store tuples so the config stays hashable and frozen.
        object.__setattr__(self, "init_range", tuple(self.init_range))
        lo, hi = self._pair("init_range", self.init_range)
        if not (0 < lo <= hi):
            raise ValueError(f"init_range={self.init_range!r} must satisfy 0 < lo <= hi (default (0.3, 1.2))")
        if self.log_scale_clamp is not None:
            object.__setattr__(self, "log_scale_clamp", tuple(self.log_scale_clamp))
            lo, hi = self._pair("log_scale_clamp", self.log_scale_clamp)
            if not lo < hi:
                raise ValueError(f"log_scale_clamp={self.log_scale_clamp!r} needs lo < hi (theta = ln(scale)), "
                                 f"or None for no clamp")
        for field in ("include", "exclude"):
            value = getattr(self, field)
            if isinstance(value, str):
                raise ValueError(f"{field}={value!r} must be a sequence of regexes, not one string: "
                                 f"write ({value!r},)")
            object.__setattr__(self, field, tuple(value))
            for pattern in getattr(self, field):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{field} pattern {pattern!r} is not a valid regex: {e}") from None
        if not (isinstance(self.scale_lr_mult, (int, float)) and self.scale_lr_mult > 0):
            raise ValueError(f"scale_lr_mult={self.scale_lr_mult!r} must be a positive number (default 10.0)")

    @staticmethod
    def _pair(name, value) -> tuple[float, float]:
        if len(value) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
            raise ValueError(f"{name}={value!r} must be two finite numbers (lo, hi)")
        return float(value[0]), float(value[1])

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        return qmin_qmax(self.bits)

    def to_dict(self) -> dict:
        """JSON-friendly (tuples become lists); `from_dict(to_dict())` gives an equal config."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """Inverse of `to_dict`. Ignores "layers", which the export adds next to the config
        (architecture.md, final export); any other unknown key is an error (a typo would silently
        fall back to a default otherwise)."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known - {"layers"}
        if extra:
            raise ValueError(f"unknown QuantConfig keys {sorted(extra)}; valid keys are {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})
