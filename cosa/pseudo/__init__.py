"""Teacher pseudo-labels: the multi-scale teacher pass, CPL/SPL, and dynamic thresholds.

METHOD.md sections 3 and 5.2. `cosa.pseudo.second_stage` (`cosa pseudo`: pseudo-masks of a trained
model for a second, fully supervised stage) is imported on its own: it builds on
`cosa.evaluation`, which builds on this package.
"""

from cosa.pseudo.labels import IGNORE_INDEX, box_mask, cam_pseudo_label, seg_pseudo_label
from cosa.pseudo.teacher import TeacherOutput, teacher_forward
from cosa.pseudo.thresholds import (
    DynamicThresholds,
    GaussianMixture1D,
    fit_gaussian_mixture_1d,
    queue_values,
)

__all__ = [
    "IGNORE_INDEX",
    "DynamicThresholds",
    "GaussianMixture1D",
    "TeacherOutput",
    "box_mask",
    "cam_pseudo_label",
    "fit_gaussian_mixture_1d",
    "queue_values",
    "seg_pseudo_label",
    "teacher_forward",
]
