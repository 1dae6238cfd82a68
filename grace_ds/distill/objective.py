"""The GRACE objective: L = CE + beta * L_GDKD + omega * L_RCKA (grace-method.md).

GraceObjective is called once per micro-batch inside the student wrapper's forward (so ZeRO-3 has
the lm_head weight gathered) and returns the loss plus float metrics; the trainer calls
controller_step once per optimizer step with the GDKD value averaged over the accumulation cycle
and all ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from grace_ds.distill.cka import rcka_loss
from grace_ds.distill.controller import CONTROLLER_PRESETS, IBController, check_controller_args
from grace_ds.distill.fused import fused_gdkd_ce
from grace_ds.distill.gdkd import check_kd_options, compute_dtype, empty_loss_like, kd_loss_with_stats


@dataclass
class GraceConfig:
    # GDKD (section 1; authors' script defaults)
    temperature: float = 2.0          # KD softmax temperature T; losses are scaled by T^2
    alpha: float = 1.0                # TCKD weight
    beta_dkd: float = 4.0             # NCKD weight ("dark knowledge", > alpha)
    kd_mode: str = "gdkd"             # "gdkd" (GRACE) or "kl" (token KL(p_T||p_S) * T^2: naive-KD baseline)
    gate: bool = True                 # entropy gate g = exp(-H/log|V|); False = uniform token weights (ablation)
    use_kd: bool = True               # False: no KD term at all (CE [+ RCKA] only)
    kd_warmup_steps: int = 0          # optimizer steps of linear warm-up of beta (0 = none)
    # RCKA (section 2)
    use_rcka: bool = True
    omega: float = 1.0                # RCKA weight (code default; authors' script 3.0)
    omega_warmup_steps: int = 0       # optimizer steps of linear warm-up of omega (authors' script 400)
    # IB controller (section 3; code defaults, see CONTROLLER_PRESETS for the authors' script set)
    controller: bool = True           # False: beta = fixed_beta for the whole run
    tau: float = 0.35                 # information budget on L_GDKD (nats * T^2)
    eta: float = 0.0015               # dual-ascent step size per optimizer step
    beta_init: float = 1.0
    beta_min: float = 0.1
    beta_max: float = 5.0
    ema_decay: float = 0.99           # EMA decay of the GDKD reading, per optimizer step
    fixed_beta: float | None = None   # beta when controller=False (None = beta_init)
    # Implementation
    chunk_size: int = 1024            # tokens per chunk: extra memory ~ chunk * V * 4 B * ~10 temporaries
    fused: bool = True                # logits from hidden states chunk by chunk (False: materialise them)

    def __post_init__(self):
        for k in ("gate", "use_kd", "use_rcka", "controller", "fused"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"grace.{k}={getattr(self, k)!r}: must be true or false (a bool, not a string)")
        for k in ("kd_warmup_steps", "omega_warmup_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"grace.{k}={v!r}: must be an int >= 0 (optimizer steps; 0 disables the warm-up)")
        check_kd_options(self.temperature, self.alpha, self.beta_dkd, self.kd_mode, self.chunk_size)
        if not (isinstance(self.omega, (int, float)) and math.isfinite(self.omega) and self.omega >= 0):
            raise ValueError(f"grace.omega={self.omega!r}: must be a finite number >= 0 (code 1.0, authors 3.0)")
        check_controller_args(self.tau, self.eta, self.beta_init, self.beta_min, self.beta_max, self.ema_decay)
        if self.fixed_beta is not None and not (
            isinstance(self.fixed_beta, (int, float)) and math.isfinite(self.fixed_beta) and self.fixed_beta >= 0
        ):
            raise ValueError(f"grace.fixed_beta={self.fixed_beta!r}: must be a finite number >= 0 or null (= beta_init)")

    @classmethod
    def authors_script(cls, **overrides) -> "GraceConfig":
        """The authors' published script: omega 3.0 warmed up over 400 steps, their controller set."""
        base = dict(omega=3.0, omega_warmup_steps=400, **CONTROLLER_PRESETS["authors_script"])
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_dict(cls, d: dict) -> "GraceConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown grace option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def linear_warmup(step: int, steps: int) -> float:
    """Weight factor min(1, step / steps) for the 0-based optimizer step; 1 when steps == 0."""
    return 1.0 if steps == 0 else min(1.0, max(step, 0) / steps)


def _plain_ce(student_logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """HF's shifted causal-LM CE (mean over supervised tokens) on materialised logits, fp32."""
    V = student_logits.shape[-1]
    tgt = labels[:, 1:].reshape(-1).to(student_logits.device)
    if not bool((tgt != ignore_index).any()):
        return empty_loss_like(student_logits)
    logits = student_logits[:, :-1].reshape(-1, V).to(compute_dtype(student_logits.dtype))
    return F.cross_entropy(logits, tgt, ignore_index=ignore_index)


@dataclass
class _Counters:
    nonfinite_kd: int = 0
    nonfinite_rcka: int = 0


class GraceObjective:
    """Callable GRACE loss with its controller state (see module docstring).

    metrics (floats): ce, gdkd, rcka (raw term values, nan when non-finite), beta and omega (the
    weights actually applied this call, warm-ups included, so loss == ce + beta*gdkd + omega*rcka
    for finite terms), beta_controller (the controller's/fixed beta before warm-up), gate_mean,
    teacher_entropy, rcka_used, rcka_skipped (this call), nonfinite_kd, nonfinite_rcka
    (cumulative counts since the start of the run, restored by load_state_dict).
    """

    def __init__(self, cfg: GraceConfig | None = None):
        self.cfg = cfg if cfg is not None else GraceConfig()
        c = self.cfg
        self.controller = (
            IBController(c.tau, c.eta, c.beta_init, c.beta_min, c.beta_max, c.ema_decay) if c.controller else None
        )
        self.counters = _Counters()

    @property
    def beta(self) -> float:
        if self.controller is not None:
            return self.controller.beta
        return self.cfg.beta_init if self.cfg.fixed_beta is None else float(self.cfg.fixed_beta)

    def __call__(
        self,
        *,
        labels: Tensor,
        step: int,
        student_hidden: Tensor | None = None,
        student_weight: Tensor | None = None,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        student_visual: list[Tensor] | None = None,
        teacher_visual: list[Tensor] | None = None,
        vocab_size: int | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        student_logits: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        ignore_index: int = -100,
    ) -> tuple[Tensor, dict[str, float]]:
        """loss = ce + beta * gdkd + omega * rcka for one micro-batch.

        Student: hidden + lm_head weight (fused or, with cfg.fused False, materialised), or
        student_logits. Teacher: hidden + weight, or teacher_logits (offline cache), or none
        (CE-only training). Visual features: per-image lists for RCKA (teacher entries may be
        hidden states; see rcka_loss for Gram inputs). step: 0-based optimizer step (warm-ups,
        error messages).
        """
        c = self.cfg
        use_kd = c.use_kd and (teacher_hidden is not None or teacher_logits is not None)
        if student_logits is None and (student_hidden is None or student_weight is None):
            raise ValueError("pass student_hidden and student_weight (fused) or student_logits")
        kd_kw = dict(temperature=c.temperature, alpha=c.alpha, beta_dkd=c.beta_dkd, ignore_index=ignore_index,
                     chunk_size=c.chunk_size, kd_mode=c.kd_mode, gate=c.gate)
        fused = student_logits is None and c.fused and (not use_kd or teacher_logits is None)
        if fused:
            out = fused_gdkd_ce(student_hidden, student_weight, teacher_hidden if use_kd else None,
                                teacher_weight if use_kd else None, labels, vocab_size=vocab_size,
                                student_bias=student_bias, teacher_bias=teacher_bias if use_kd else None, **kd_kw)
            ce, gdkd, gate_mean, ent_mean = out.ce, out.gdkd, out.gate_mean, out.teacher_entropy_mean
        else:
            if student_logits is None:
                student_logits = F.linear(student_hidden, student_weight, student_bias)
            ce = _plain_ce(student_logits, labels, ignore_index)
            gdkd = gate_mean = ent_mean = None
            if use_kd:
                if teacher_logits is None:
                    with torch.no_grad():
                        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
                V = min(student_logits.shape[-1], teacher_logits.shape[-1]) if vocab_size is None else vocab_size
                gdkd, gate_mean, ent_mean, _ = kd_loss_with_stats(
                    student_logits[..., :V], teacher_logits[..., :V].detach(), labels, **kd_kw)
        if not use_kd:
            gdkd = None

        rcka = None
        used = skipped = 0
        if c.use_rcka and student_visual is not None and teacher_visual is not None:
            rcka, used, skipped = rcka_loss(teacher_visual, student_visual)

        # One host sync for every scalar the metrics and the finiteness checks need.
        vals = [ce.detach().float()]
        for t in (gdkd, gate_mean, ent_mean, rcka):
            vals.append(t.detach().float().reshape(()) if t is not None else torch.zeros((), device=ce.device))
        ce_v, kd_v, gate_v, ent_v, rcka_v = torch.stack([v.to(ce.device) for v in vals]).tolist()
        if not math.isfinite(ce_v):
            raise FloatingPointError(
                f"non-finite student CE ({ce_v}) at step {step}: this is a bug or a diverged run (check the "
                f"learning rate, the quantiser scales and the input batch), not something to skip"
            )

        beta_raw = self.beta
        beta = beta_raw * linear_warmup(step, c.kd_warmup_steps) if use_kd else 0.0
        omega = c.omega * linear_warmup(step, c.omega_warmup_steps) if rcka is not None else 0.0
        loss = ce
        # A non-finite term is left out of the graph entirely (0 * nan would still be nan, in the
        # value and in the gradients).
        # A zero weight (warm-up step 0, beta_min 0) also leaves the term out: the fused backward then
        # skips recomputing the KD branch altogether.
        if gdkd is not None:
            if not math.isfinite(kd_v):
                self.counters.nonfinite_kd += 1
            elif beta > 0:
                loss = loss + beta * gdkd
        if rcka is not None:
            if not math.isfinite(rcka_v):
                self.counters.nonfinite_rcka += 1
            elif omega > 0:
                loss = loss + omega * rcka.to(loss.dtype)
        metrics = {
            "ce": ce_v,
            "gdkd": kd_v if gdkd is not None else 0.0,
            "rcka": rcka_v if rcka is not None else 0.0,
            "beta": beta,
            "beta_controller": beta_raw,
            "omega": omega,
            "gate_mean": gate_v,
            "teacher_entropy": ent_v,
            "rcka_used": float(used),
            "rcka_skipped": float(skipped),
            "nonfinite_kd": float(self.counters.nonfinite_kd),
            "nonfinite_rcka": float(self.counters.nonfinite_rcka),
        }
        return loss, metrics

    def controller_step(self, gdkd_value: float) -> float:
        """Once per optimizer step, with L_GDKD averaged over the accumulation cycle and all ranks.
        Returns the beta for the next step (unchanged when the controller is off)."""
        if self.controller is not None:
            return self.controller.update(gdkd_value)
        return self.beta

    def state_dict(self) -> dict:
        return {
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "counters": dataclasses.asdict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.controller is not None:
            if state.get("controller") is None:
                raise KeyError("checkpoint has no controller state but grace.controller is true: resume with the "
                               "same grace config (or start a new run)")
            self.controller.load_state_dict(state["controller"])
        self.counters = _Counters(**state.get("counters", {}))
