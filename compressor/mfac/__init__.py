"""The math of M-FAC (Frantar et al., 2021): matrix-free inverse-Fisher-vector products.

Needs torch alone. ``FisherInverse`` is the static algorithm (paper 3.1),
``SlidingFisherInverse`` the dynamic one (3.2) and ``MFAC`` the optimizer built on it (4.2).
``ShardedSlidingFisherInverse`` is the dynamic window sharded by coordinates over torch.distributed
ranks (``MFAC(..., shard=True)``); ``shard_range`` is the split of n items over ranks that it and
the gradient sampler share.
"""

from .dynamic import SlidingFisherInverse
from .optim import MFAC
from .partition import shard_range
from .sharded import ShardedSlidingFisherInverse
from .static import FisherInverse

__all__ = ["MFAC", "FisherInverse", "ShardedSlidingFisherInverse", "SlidingFisherInverse", "shard_range"]
