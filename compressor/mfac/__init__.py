"""The math of M-FAC (Frantar et al., 2021): matrix-free inverse-Fisher-vector products.

Needs torch alone. ``FisherInverse`` is the static algorithm (paper 3.1),
``BlockFisherInverse`` its block-diagonal form accumulated from streamed gradient chunks (memory d * B
whatever m is), ``SlidingFisherInverse`` the dynamic one (3.2) and ``MFAC`` the optimizer built on it (4.2).
``ShardedSlidingFisherInverse`` is the dynamic window sharded by coordinates over torch.distributed
ranks (``MFAC(..., shard=True)``); ``shard_range`` is the split of n items over ranks that it and
the gradient sampler share. ``compressor.mfac.obs`` holds the Optimal-Brain-Surgeon saliencies,
updates and dampening that the pruners share (its public names are exported here too).
"""

from .block_fisher import BlockFisherInverse
from .dynamic import SlidingFisherInverse
from .obs import (
    GroupOBS,
    NMChoice,
    damping,
    group_obs,
    mean_fisher_diagonal,
    nm_best_subsets,
    obs_update,
    removal_vector,
    saliencies,
    schur_group_saliencies,
    schur_removal_update,
    spd_solve,
)
from .optim import MFAC
from .partition import shard_range
from .sharded import ShardedSlidingFisherInverse
from .static import FisherInverse

__all__ = [
    "MFAC",
    "BlockFisherInverse",
    "FisherInverse",
    "GroupOBS",
    "NMChoice",
    "ShardedSlidingFisherInverse",
    "SlidingFisherInverse",
    "damping",
    "group_obs",
    "mean_fisher_diagonal",
    "nm_best_subsets",
    "obs_update",
    "removal_vector",
    "saliencies",
    "schur_group_saliencies",
    "schur_removal_update",
    "shard_range",
    "spd_solve",
]
