"""Test oracles, the tolerance rule and NaN poisoning, shared by the tests and the benchmarks.

Only tests and benchmarks import this package (DESIGN.md §2); the library never does.

- :func:`dense_attention`: the obviously-right float64 dense masked attention (the golden result).
- :func:`plain_attention`: the same maths in the test dtype (the baseline error of the tolerance rule).
- :func:`brute_force_mask`: a pattern's token mask evaluated position by position, without compiling blocks.
- :func:`assert_within`: ``err(fast, golden) <= k * err(baseline, golden) + eps`` on the max error.
- :func:`poison_empty`: fresh ``torch.empty`` / ``empty_like`` / ``new_empty`` tensors are NaN-filled.
"""

from spattn.testing.oracles import brute_force_mask, dense_attention, plain_attention
from spattn.testing.poison import poison_empty
from spattn.testing.tolerance import assert_within, max_err

__all__ = ["assert_within", "brute_force_mask", "dense_attention", "max_err", "plain_attention", "poison_empty"]
