"""Weight-space editing: task vectors and merging (task arithmetic, TIES, DARE), alignment before merging."""
from .align import align_then_merge
from .methods import METHODS, magnitude_prune, merge, random_prune
from .task_vector import TaskVector

__all__ = ["METHODS", "TaskVector", "align_then_merge", "magnitude_prune", "merge", "random_prune"]
