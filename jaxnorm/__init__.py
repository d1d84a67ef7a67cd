"""jaxnorm: exact, fast batch and layer normalization for JAX.

Pure functions compute statistics (`moments`, `merge_moments`) and normalize with them
(`normalize`, `layer_norm`, `rms_norm`, `group_norm`, `instance_norm`, `batch_norm`,
`batch_renorm`; `add_layer_norm` and `add_rms_norm` with a transformer's residual add first);
batch normalization's running statistics are an explicit `BatchNormState`
pytree, and `fold_batch_norm` folds an evaluation-mode batch normalization into the layer before
it, and `fold_norm_into_dense` a layer or RMS norm's scale and offset into the Dense layer
after it. Flax wrappers live in `jaxnorm.linen` and `jaxnorm.nnx`, Equinox ones in
`jaxnorm.equinox`, PyTorch checkpoint conversion in `jaxnorm.interop`; importing `jaxnorm`
itself never imports flax, equinox or torch.
"""

from ._batch_norm import BatchNormState as BatchNormState
from ._batch_norm import batch_norm as batch_norm
from ._batch_norm import batch_norm_init as batch_norm_init
from ._batch_norm import batch_renorm as batch_renorm
from ._batch_norm import momentum_from_torch as momentum_from_torch
from ._batch_norm import update_running_stats as update_running_stats
from ._fold import fold_batch_norm as fold_batch_norm
from ._fold import fold_norm_into_dense as fold_norm_into_dense
from ._normalize import group_norm as group_norm
from ._normalize import instance_norm as instance_norm
from ._normalize import layer_norm as layer_norm
from ._normalize import normalize as normalize
from ._normalize import rms_norm as rms_norm
from ._replicas import sync_running_stats as sync_running_stats
from ._residual import add_layer_norm as add_layer_norm
from ._residual import add_rms_norm as add_rms_norm
from ._stats import Moments as Moments
from ._stats import merge_moments as merge_moments
from ._stats import moments as moments
from ._version import __version__ as __version__

__all__ = (
    "BatchNormState",
    "Moments",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "batch_norm_init",
    "batch_renorm",
    "fold_batch_norm",
    "fold_norm_into_dense",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "merge_moments",
    "moments",
    "momentum_from_torch",
    "normalize",
    "rms_norm",
    "sync_running_stats",
    "update_running_stats",
)
