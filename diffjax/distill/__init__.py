"""Few-step generation on the training core: consistency distillation and training (CD, CT with the
iCT/ECT schedules), continuous-time consistency models (sCM on TrigFlow), MeanFlow and shortcut
models (average velocities), progressive distillation, distribution matching (DMD, with DMD's
regression and DMD2's GAN terms) and score identity distillation (SiD), the samplers for the
resulting one- and few-step models, and reward fine-tuning through the sampler (DRaFT).

Every objective is a `loss_fn(params, key, batch) -> (loss, aux)` for
`diffjax.training.make_train_step`, over a params pytree holding the student (and, where used, an
EMA target, a teacher, an adaptive weighting, a fake-score network); see `diffjax.distill.common`.
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
from diffjax.distill.dmd import (
    PairsFromBatch,
    PairsFromTeacher,
    distribution_matching_gradient,
    dmd_loss,
    score_identity_term,
    sid_loss,
    teacher_ode_pairs,
)
from diffjax.distill.draft import draft_loss
from diffjax.distill.meanflow import (
    AverageVelocity,
    AverageVelocityJump,
    meanflow_loss,
    meanflow_target,
    shortcut_loss,
)
from diffjax.distill.progressive import progressive_distillation_loss, progressive_target, student_times
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

__all__ = [  # alphabetical
    "AdaptiveWeighting",
    "AverageVelocity",
    "AverageVelocityJump",
    "consistency_distillation_loss",
    "consistency_grid",
    "consistency_training_loss",
    "ConsistencyFunction",
    "ConsistencySampler",
    "distribution_matching_gradient",
    "dmd_loss",
    "draft_loss",
    "EasyDiscretisation",
    "ImprovedDiscretisation",
    "karras_noise_levels",
    "KarrasDiscretisation",
    "L2",
    "meanflow_loss",
    "meanflow_target",
    "PairsFromBatch",
    "PairsFromTeacher",
    "progressive_distillation_loss",
    "progressive_target",
    "PseudoHuber",
    "scm_loss",
    "scm_tangent",
    "score_identity_term",
    "shortcut_loss",
    "sid_loss",
    "student_times",
    "TangentClipping",
    "TangentNormalization",
    "teacher_ode_pairs",
    "teacher_ode_step",
    "TrigFlow",
    "TrigFlowConsistency",
    "update_target",
]
