"""Few-step generation on the training core: consistency distillation and training (CD, CT with the
iCT/ECT schedules), continuous-time consistency models (sCM on TrigFlow), progressive distillation,
and the samplers for the resulting one- and few-step models.

Every objective is a `loss_fn(params, key, batch) -> (loss, aux)` for
`diffjax.training.make_train_step`, over a params pytree holding the student (and, where used, an
EMA target, a teacher, an adaptive weighting); see `diffjax.distill.common`.
"""

from diffjax.distill.common import L2, PseudoHuber, update_target
from diffjax.distill.consistency import (
    ConsistencyFunction,
    EasyDiscretisation,
    ImprovedDiscretisation,
    KarrasDiscretisation,
    consistency_distillation_loss,
    consistency_training_loss,
    karras_noise_levels,
    teacher_ode_step,
)
from diffjax.distill.samplers import ConsistencySampler, consistency_grid
from diffjax.distill.scm import (
    AdaptiveWeighting,
    TangentClipping,
    TangentNormalization,
    TrigFlow,
    TrigFlowConsistency,
    scm_loss,
    scm_tangent,
)

__all__ = [
    "L2",
    "PseudoHuber",
    "update_target",
    "ConsistencyFunction",
    "KarrasDiscretisation",
    "ImprovedDiscretisation",
    "EasyDiscretisation",
    "karras_noise_levels",
    "teacher_ode_step",
    "consistency_distillation_loss",
    "consistency_training_loss",
    "ConsistencySampler",
    "consistency_grid",
    "TrigFlow",
    "TrigFlowConsistency",
    "TangentNormalization",
    "TangentClipping",
    "AdaptiveWeighting",
    "scm_tangent",
    "scm_loss",
]
