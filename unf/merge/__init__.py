"""Weight-space editing: task vectors and merging (task arithmetic, TIES, DARE), alignment before merging, CUTS
unlearning, merge protection and the re-basin attack on it."""
from .align import align_then_merge
from .cuts import CutsResult, cuts, knn_agreement, last_linear_input, pseudo_labels, select_alpha
from .methods import METHODS, magnitude_prune, merge, random_prune
from .protect import canonical_scales, mixable_groups, protect, unprotect
from .task_vector import TaskVector

__all__ = ["METHODS", "CutsResult", "TaskVector", "align_then_merge", "canonical_scales", "cuts", "knn_agreement",
           "last_linear_input", "magnitude_prune", "merge", "mixable_groups", "protect", "pseudo_labels",
           "random_prune", "select_alpha", "unprotect"]
