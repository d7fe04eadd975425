"""Re-basin: align networks by permutation for any spec, and measure linear mode connectivity."""
from .activations import activation_matching
from .heads import head_groups, head_signatures, match_heads
from .lmc import interpolate, loss_barrier, reset_bn_stats
from .matching import align_many, merge_many, permute_batched, places, weight_matching

__all__ = ["activation_matching", "align_many", "head_groups", "head_signatures", "interpolate", "loss_barrier", "match_heads", "merge_many",
           "permute_batched", "places", "reset_bn_stats", "weight_matching"]
