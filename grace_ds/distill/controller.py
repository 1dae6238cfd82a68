"""Adaptive information-bottleneck controller (GRACE section 3).

beta is the Lagrange multiplier of the constraint L_GDKD <= tau, updated by projected dual ascent
once per optimizer step:

    ema  <- d * ema + (1 - d) * value
    beta <- clip(beta + eta * (ema - tau), beta_min, beta_max)

EMA initialisation (not fixed by the paper): the first update sets ema = value. Starting from 0
would bias the EMA low for ~1/(1-d) = 100 steps and pull beta down before any evidence; starting
from tau would hide the first real readings. The caller passes the value already averaged over the
accumulation cycle and all-reduced over ranks, so every rank holds the same state.
"""

from __future__ import annotations

import math
from typing import ClassVar

# The two default sets of grace-method.md section 3.
CONTROLLER_PRESETS: dict[str, dict[str, float]] = {
    "code": dict(tau=0.35, eta=0.0015, beta_init=1.0, beta_min=0.1, beta_max=5.0, ema_decay=0.99),
    "authors_script": dict(tau=3.0, eta=0.003, beta_init=0.5, beta_min=0.1, beta_max=1.0, ema_decay=0.99),
}


def check_controller_args(tau, eta, beta_init, beta_min, beta_max, ema_decay) -> None:
    vals = dict(tau=tau, eta=eta, beta_init=beta_init, beta_min=beta_min, beta_max=beta_max, ema_decay=ema_decay)
    for k, v in vals.items():
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise ValueError(f"controller {k}={v!r}: must be a finite number")
    if eta < 0:
        raise ValueError(f"controller eta={eta}: must be >= 0 (dual ascent step size, code default 0.0015)")
    if not 0 <= beta_min <= beta_max:
        raise ValueError(f"controller bounds [{beta_min}, {beta_max}]: need 0 <= beta_min <= beta_max")
    if not beta_min <= beta_init <= beta_max:
        raise ValueError(f"controller beta_init={beta_init} outside [beta_min, beta_max] = [{beta_min}, {beta_max}]")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"controller ema_decay={ema_decay}: must be in [0, 1) (default 0.99)")


class IBController:
    """Projected dual ascent on beta for the budget L_GDKD <= tau (see module docstring)."""

    PRESETS: ClassVar[dict[str, dict[str, float]]] = CONTROLLER_PRESETS

    def __init__(self, tau: float = 0.35, eta: float = 0.0015, beta_init: float = 1.0, beta_min: float = 0.1,
                 beta_max: float = 5.0, ema_decay: float = 0.99):
        check_controller_args(tau, eta, beta_init, beta_min, beta_max, ema_decay)
        self.tau, self.eta = float(tau), float(eta)
        self.beta_min, self.beta_max, self.ema_decay = float(beta_min), float(beta_max), float(ema_decay)
        self.beta = float(beta_init)
        self.ema: float | None = None   # None until the first update (then ema = first value)
        self.steps = 0                  # updates applied

    @classmethod
    def from_preset(cls, name: str) -> "IBController":
        """"code" (tau 0.35, eta 0.0015, beta 1.0 in [0.1, 5]) or "authors_script" (tau 3, eta 0.003, beta 0.5 in [0.1, 1])."""
        if name not in CONTROLLER_PRESETS:
            raise ValueError(f"unknown controller preset {name!r}: use one of {sorted(CONTROLLER_PRESETS)}")
        return cls(**CONTROLLER_PRESETS[name])

    def update(self, value: float) -> float:
        """One dual-ascent step with this optimizer step's (rank- and accumulation-averaged) L_GDKD.

        A non-finite value is ignored (state unchanged): one bad step must not poison the EMA.
        """
        value = float(value)
        if not math.isfinite(value):
            return self.beta
        d = self.ema_decay
        self.ema = value if self.ema is None else d * self.ema + (1.0 - d) * value
        self.beta = min(self.beta_max, max(self.beta_min, self.beta + self.eta * (self.ema - self.tau)))
        self.steps += 1
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        missing = {"beta", "ema"} - set(state)
        if missing:
            raise KeyError(f"controller state lacks {sorted(missing)}: was it saved by IBController.state_dict()?")
        self.beta = float(state["beta"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.steps = int(state.get("steps", 0))

    def __repr__(self) -> str:
        return (f"IBController(tau={self.tau}, eta={self.eta}, beta={self.beta}, range=[{self.beta_min}, "
                f"{self.beta_max}], ema_decay={self.ema_decay}, ema={self.ema})")
