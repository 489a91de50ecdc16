"""deepspeed_diffusers_attn: fast Stable Diffusion attention for Hugging Face diffusers.

    import deepspeed_diffusers_attn as dda
    report = dda.patch(pipe)      # swap every supported diffusers Attention
    print(report)
    dda.unpatch(pipe)             # exact restore

Public names: :func:`patch`, :func:`unpatch`, :class:`PatchReport`,
:class:`DeepSpeedDiffusersAttention`, :class:`DeepSpeedDiffusersAttentionConfig`,
:class:`DeepSpeedDiffusersAttentionFunction`, :func:`from_diffusers` and :func:`supports`
(one diffusers attention module to a fused module, through its family's adapter in
:mod:`.adapters`), :func:`bridge_stats` (the attention calls of "bridged" modules that our
kernel served or that fell back to diffusers, per reason), and the raw ops in :mod:`.ops`
(also ``torch.ops.dda.*``). :func:`cfg_parallel` / :func:`uncfg_parallel` (:mod:`.parallel`)
split a classifier-free-guidance batch over the ranks of a torch.distributed group.
"""
import torch  # noqa: F401  (must load before the extension)

try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "deepspeed_diffusers_attn: the compiled extension _C is missing or does not match this "
        f"torch ({torch.__version__}). Reinstall with `pip install --no-build-isolation -e .`. "
        f"Cause: {e}"
    ) from e

from . import ops
from .attention import (
    DeepSpeedDiffusersAttention,
    DeepSpeedDiffusersAttentionConfig,
    DeepSpeedDiffusersAttentionFunction,
)
from .adapters import from_diffusers, supports
from .adapters.dispatch_bridge import bridge_stats
from .patch import PatchReport, patch, unpatch
from .parallel import cfg_parallel, uncfg_parallel

__version__ = "0.1.0"

__all__ = [
    "ops",
    "patch",
    "unpatch",
    "PatchReport",
    "cfg_parallel",
    "uncfg_parallel",
    "from_diffusers",
    "supports",
    "bridge_stats",
    "DeepSpeedDiffusersAttention",
    "DeepSpeedDiffusersAttentionConfig",
    "DeepSpeedDiffusersAttentionFunction",
]
