"""Weight-space editing: task vectors and merging (task arithmetic, TIES, DARE), alignment before merging, merge
protection and the re-basin attack on it."""
from .align import align_then_merge
from .methods import METHODS, magnitude_prune, merge, random_prune
from .protect import canonical_scales, mixable_groups, protect, unprotect
from .task_vector import TaskVector

__all__ = ["METHODS", "TaskVector", "align_then_merge", "canonical_scales", "magnitude_prune", "merge", "mixable_groups",
           "protect", "random_prune", "unprotect"]
