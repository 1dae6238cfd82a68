"""The GRACE objective (grace-method.md sections 1-3): L = CE + beta * GDKD + omega * RCKA.

gdkd.py        gated decoupled KD on materialised logits (and the shared per-token math)
fused.py       fused student CE + gated KD from hidden states and lm_head weights (chunked, recomputing)
cka.py         linear CKA and the per-image relational CKA loss
controller.py  the information-bottleneck controller on beta (projected dual ascent)
objective.py   GraceConfig and GraceObjective (the combined loss + metrics + controller state)
zero3.py       registering the lm_head weight on the module that calls the fused loss
"""

from grace_ds.distill.cka import cka, cka_from_grams, cosine_gram, rcka_loss
from grace_ds.distill.controller import CONTROLLER_PRESETS, IBController
from grace_ds.distill.fused import FusedLossOutput, fused_gdkd_ce
from grace_ds.distill.gdkd import gated_dkd_loss
from grace_ds.distill.objective import GraceConfig, GraceObjective
from grace_ds.distill.zero3 import register_head_for_loss

__all__ = [
    "CONTROLLER_PRESETS",
    "FusedLossOutput",
    "GraceConfig",
    "GraceObjective",
    "IBController",
    "cka",
    "cka_from_grams",
    "cosine_gram",
    "fused_gdkd_ce",
    "gated_dkd_loss",
    "rcka_loss",
    "register_head_for_loss",
]
