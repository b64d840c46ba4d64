"""Training losses: classification, swapped assignments, CRF energy, RAW, CSP, the objective.

METHOD.md sections 4 and 5.
"""

from cosa.losses.classification import classification_loss
from cosa.losses.crf import crf_energy_loss
from cosa.losses.objective import TERM_NAMES, CosaObjective, ObjectiveResult
from cosa.losses.reliability import reliability_pseudo_label
from cosa.losses.separation import contrastive_separation_loss, labels_at_cell_centres
from cosa.losses.swapped import balanced_cross_entropy, cam2seg_loss, seg2cam_loss

__all__ = [
    "TERM_NAMES",
    "CosaObjective",
    "ObjectiveResult",
    "balanced_cross_entropy",
    "cam2seg_loss",
    "classification_loss",
    "contrastive_separation_loss",
    "crf_energy_loss",
    "labels_at_cell_centres",
    "reliability_pseudo_label",
    "seg2cam_loss",
]
