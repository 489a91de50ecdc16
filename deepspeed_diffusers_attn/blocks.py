"""Fused stand-ins for two non-attention pieces of a diffusers UNet / VAE.

* :class:`FusedGEGLU` replaces diffusers' ``GEGLU`` (the FeedForward of every transformer
  block): the same ``proj`` Linear, then :func:`.ops.geglu`, one pass that reads the
  projection once and writes the result once. Stock runs ``chunk -> gelu(gate) -> mul`` as
  two strided elementwise kernels plus a temporary.
* :class:`ChannelsLastGroupNorm` replaces ``torch.nn.GroupNorm``: for channels-last input it
  runs :func:`.ops.group_norm` in that layout. torch's GroupNorm makes such input NCHW first
  and returns NCHW, so each call costs a permuting copy and the next convolution a layout
  conversion back. Other inputs (NCHW, or what the kernel does not take: see
  :func:`.ops.group_norm_supported`) run ``F.group_norm``, exactly what stock runs; the
  module counts them (``fallback_calls``, ``last_fallback_reason``).
* :func:`fuse_resnet` gives a diffusers ``ResnetBlock2D`` (whose norms are the stand-ins
  above) a forward that runs ``norm1 -> SiLU`` and ``hidden + time embedding -> norm2 -> SiLU``
  as one :func:`.ops.group_norm` call each (``silu=True``, ``shift=``), on CUDA with conv1's
  bias folded into that shift too: per block, four elementwise passes over the activation
  fewer, among them two broadcast adds (non-vectorised kernels on channels-last tensors).
* :func:`keep_output_layout` makes a ``Transformer2DModel`` return its output in the
  memory format of its input: stock ends with ``.permute(0, 3, 1, 2).contiguous()``, which
  turns a channels-last UNet's activations NCHW (a permuting copy), and the next
  convolution converts them back. Same values, no copies.

:func:`fuse_resnet` and :func:`keep_output_layout` bind a method to the instance, so a patched
model deep-copies but does not pickle as a whole object (``torch.save(model)``; its
``state_dict`` is unaffected): :func:`.patch.unpatch` it first.

The two module stand-ins keep the original unregistered in ``.original`` and share its parameters (same
``Parameter`` objects, same ``state_dict`` keys): no weight memory is duplicated, and
:func:`.patch.unpatch` puts the originals back. Values: the GEGLU product and the
GroupNorm normalisation are computed in fp32 and rounded once (stock rounds the gelu to the
activation dtype before the product), so outputs differ from stock by at most about one
rounding of the activation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

__all__ = ["FusedGEGLU", "ChannelsLastGroupNorm", "fusable_reasons", "fuse_resnet", "restore_resnet",
           "keep_output_layout", "restore_output_layout"]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def fusable_reasons(module: nn.Module) -> list[str]:
    """Why ``module`` (a diffusers GEGLU or a torch GroupNorm) cannot be replaced; [] if it can."""
    from diffusers.models.activations import GEGLU

    if module._forward_hooks or module._forward_pre_hooks:
        return ["it has forward hooks (a stand-in would not run them)"]
    if "forward" in vars(module):
        return ["its forward was replaced on the instance (an accelerate offload hook?)"]
    if type(module) is GEGLU:
        if type(module.proj) is not nn.Linear:
            return [f"its proj is a {type(module.proj).__name__} (LoRA / adapter layers are not fused)"]
        if type(module).gelu is not GEGLU.gelu or type(module).forward is not GEGLU.forward:
            return ["GEGLU.gelu / forward were overridden"]
        return []
    if type(module) is nn.GroupNorm:
        return []
    return [f"{type(module).__name__} is neither diffusers GEGLU nor torch.nn.GroupNorm"]


class FusedGEGLU(nn.Module):
    """Stands in for a diffusers ``GEGLU``: ``proj`` (the original Linear), then :func:`.ops.geglu`
    on CUDA. On the CPU it runs the stock formula (the op's CPU impl is the fp32 C reference,
    for tests, not speed)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.proj = original.proj
        object.__setattr__(self, "original", original)  # unregistered: no duplicate parameters

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden_states = self.proj(hidden_states)
        if hidden_states.device.type != "cuda":
            value, gate = hidden_states.chunk(2, dim=-1)
            return value * F.gelu(gate)
        return ops.geglu(hidden_states)


def _traced_fusable(x: torch.Tensor) -> bool:
    # under torch.compile: layout, device and channel count decide (guards on static facts);
    # alignment holds for the fresh tensors of a UNet
    return (x.dim() == 4 and x.device.type == "cuda" and x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[1] % (16 // x.element_size()) == 0)


class ChannelsLastGroupNorm(nn.Module):
    """Stands in for a ``torch.nn.GroupNorm``: channels-last CUDA input runs :func:`.ops.group_norm`
    in that layout (the output is channels-last too), anything else ``F.group_norm`` (CPU
    input too: the op's CPU impl is the fp32 C reference, for tests, not speed)."""

    def __init__(self, original: nn.GroupNorm):
        super().__init__()
        self.num_groups = original.num_groups
        self.num_channels = original.num_channels
        self.eps = original.eps
        self.affine = original.affine
        self.weight = original.weight  # the same Parameter objects (None without affine)
        self.bias = original.bias
        object.__setattr__(self, "original", original)
        self.fallback_calls = 0
        self.last_fallback_reason = ""

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"

    def restore(self) -> nn.GroupNorm:
        """The original GroupNorm, holding this module's current weight and bias (the same
        Parameter objects unless they were replaced, e.g. by ``load_state_dict(assign=True)``)."""
        self.original.weight, self.original.bias = self.weight, self.bias
        self.original.train(self.training)
        return self.original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compiling():
            if _traced_fusable(x):
                return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        why = "CPU input" if x.device.type != "cuda" else ops.group_norm_supported(
            x, self.num_groups, self.weight, self.bias)
        if why:
            self.fallback_calls += 1
            self.last_fallback_reason = why
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _norm_silu(norm: "ChannelsLastGroupNorm", x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``silu(norm(x + shift[:, :, None, None]))`` as one op where the kernel takes it; else the
    stock composition (``norm`` counts its own fallbacks)."""
    if _compiling():
        fused = _traced_fusable(x)
    else:
        fused = x.device.type == "cuda" and not ops.group_norm_supported(x, norm.num_groups, norm.weight, norm.bias,
                                                                         shift)
    if fused:
        return ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True, shift=shift)
    if shift is not None:
        x = x + shift[:, :, None, None]
    return F.silu(norm(x))


def _plain_conv(conv: nn.Module) -> bool:
    """A torch Conv2d that F.conv2d reproduces exactly (zero padding, no hooks)."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not conv._forward_hooks
            and not conv._forward_pre_hooks)


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    # diffusers' ResnetBlock2D.forward (SiLU; time_embedding_norm "default", or any but
    # "scale_shift" without a time projection, e.g. the VAE decoder's "group"), with each
    # GroupNorm -> SiLU, and the time-embedding add before norm2, in one group_norm call
    if self.training or args or kwargs or (self.time_emb_proj is None and temb is not None
                                           and self.time_embedding_norm == "default"):
        # dropout, the deprecated scale argument, a raw temb added unprojected: stock
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    hidden_states = _norm_silu(self.norm1, input_tensor, None)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    # On CUDA conv1's bias joins the time embedding in norm2's shift: cuDNN adds a conv bias in
    # a separate broadcast pass over the output, which this saves (a constant per channel)
    conv1, bias = self.conv1, None
    if hidden_states.device.type == "cuda" and conv1.bias is not None and _plain_conv(conv1):
        bias = conv1.bias
        hidden_states = F.conv2d(hidden_states, conv1.weight, None, conv1.stride, conv1.padding, conv1.dilation,
                                 conv1.groups)
    else:
        hidden_states = conv1(hidden_states)
    shift = None
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        shift = self.time_emb_proj(temb)
    if bias is not None:
        shift = bias.expand(hidden_states.shape[0], -1) if shift is None else shift + bias
    hidden_states = _norm_silu(self.norm2, hidden_states, shift)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    output_tensor = input_tensor + hidden_states
    # x / 1.0 is x exactly: stock's division by a unit factor is a launch that changes no value
    return output_tensor if self.output_scale_factor == 1.0 else output_tensor / self.output_scale_factor


def fuse_resnet(module: nn.Module) -> bool:
    """Give a diffusers ``ResnetBlock2D`` (this instance only) the forward that folds SiLU and
    the time-embedding add into its two GroupNorm calls. Only where that is the same
    computation: the exact class with its own forward, no hooks, SiLU, the "default" time
    embedding norm (or another but "scale_shift" without a time projection: norm2 alone), and
    both norms already :class:`ChannelsLastGroupNorm` stand-ins (so fallbacks are counted
    there). False, and ``module`` untouched, otherwise."""
    from diffusers.models.resnet import ResnetBlock2D

    if type(module) is not ResnetBlock2D or "forward" in vars(module):
        return False
    parts = (module, module.norm1, module.norm2, module.nonlinearity)
    if any(m._forward_hooks or m._forward_pre_hooks for m in parts):
        return False
    plain_norm2 = module.time_embedding_norm != "scale_shift" and module.time_emb_proj is None
    if type(module.nonlinearity) is not nn.SiLU or not (module.time_embedding_norm == "default" or plain_norm2):
        return False
    if type(module.norm1) is not ChannelsLastGroupNorm or type(module.norm2) is not ChannelsLastGroupNorm:
        return False
    module.forward = _Bound(_resnet_forward, module)
    return True


class _Bound:
    """``fn`` bound to ``module``, set as an instance attribute of it that survives pickling.

    A bound method of a module-level function pickles as ``getattr(module, fn.__name__)``,
    which the loaded module does not have; this pickles as (fn, module) instead, so
    ``torch.save(model)`` / ``torch.load`` and ``copy.deepcopy`` of a patched model work.
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, fn, module: nn.Module):
        self.__func__, self.__self__ = fn, module

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return _Bound, (self.__func__, self.__self__)


def _unbind(module: nn.Module, name: str, fn) -> bool:
    """Delete the instance attribute ``name`` if it is ``fn`` bound to ``module``; False otherwise."""
    if getattr(vars(module).get(name), "__func__", None) is not fn:
        return False
    delattr(module, name)
    return True


def restore_resnet(module: nn.Module) -> bool:
    """Undo :func:`fuse_resnet`; False if it was not applied to ``module``."""
    return _unbind(module, "forward", _resnet_forward)


def _output_in_input_layout(self, hidden_states, residual, batch_size, height, width, inner_dim):
    # diffusers' Transformer2DModel._get_output_for_continuous_inputs, with the final layout
    # taken from the residual (the block's input) instead of always NCHW
    fmt = (torch.channels_last if residual.dim() == 4 and not residual.is_contiguous()
           and residual.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    if not self.use_linear_projection:
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        hidden_states = self.proj_out(hidden_states.contiguous(memory_format=fmt))
    else:
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        hidden_states = hidden_states.contiguous(memory_format=fmt)
    return hidden_states + residual


def keep_output_layout(module: nn.Module) -> bool:
    """Give a diffusers ``Transformer2DModel`` (this instance only) an output step that keeps
    its input's memory format. False if ``module`` is not one, or its class overrides the step."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if not isinstance(module, Transformer2DModel) or "_get_output_for_continuous_inputs" in vars(module):
        return False
    if type(module)._get_output_for_continuous_inputs is not Transformer2DModel._get_output_for_continuous_inputs:
        return False
    module._get_output_for_continuous_inputs = _Bound(_output_in_input_layout, module)
    return True


def restore_output_layout(module: nn.Module) -> bool:
    """Undo :func:`keep_output_layout`; False if it was not applied to ``module``."""
    return _unbind(module, "_get_output_for_continuous_inputs", _output_in_input_layout)
