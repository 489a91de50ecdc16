"""The adapter layer: one module per diffusers attention family, asked by patch().

CPU, fp32: which adapter answers for which module, that families without an adapter
are listed (declined, with the family named) instead of skipped, that a dtype the
device's kernels cannot run is declined at patch time, and that the module file
itself knows nothing of diffusers.
"""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from torch import nn

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn import adapters
from deepspeed_diffusers_attn.adapters import attention_processor, unserved
from deepspeed_diffusers_attn.adapters.attention_processor import PatchedAttention
from deepspeed_diffusers_attn.configs import SD15_UNET, scaled_down

from conftest import make_attention

PACKAGE = pathlib.Path(dda.__file__).parent


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("name", ["attention.py", "ops.py", "workspace.py"])
def test_core_files_do_not_import_diffusers_or_adapters(name):
    names = imported_modules(PACKAGE / name)
    assert not any(m.split(".")[0] == "diffusers" for m in names), names
    assert not any(m.lstrip(".").split(".")[0] in ("adapters", "patch", "graphs") for m in names), names


def test_patch_asks_the_adapters_and_never_a_family():
    names = imported_modules(PACKAGE / "patch.py")
    assert not any(m.startswith("diffusers.models.attention") for m in names), names
    assert not any("attention_processor" in m or "unserved" in m for m in names), names


def test_each_module_gets_the_first_adapter_that_claims_it():
    attn = make_attention(64, 2, 32)
    assert adapters.adapter_for(attn) is attention_processor
    assert adapters.adapter_for(nn.Linear(3, 3)) is None
    assert adapters.ADAPTERS[-1] is unserved

    class OtherFamily(nn.Module):
        processor = object()

        def set_processor(self, processor):
            self.processor = processor

    assert adapters.adapter_for(OtherFamily()) is unserved
    assert "no adapter serves OtherFamily" in adapters.supports(OtherFamily())[0]
    with pytest.raises(ValueError, match="no adapter serves OtherFamily"):
        dda.from_diffusers(OtherFamily())


def test_from_diffusers_and_supports_at_top_level():
    attn = make_attention(64, 2, 32, cross_attention_dim=48, bias=True)
    assert dda.supports(attn) == []
    fused = dda.from_diffusers(attn)
    assert isinstance(fused, dda.DeepSpeedDiffusersAttention)
    x, ctx = torch.randn(2, 9, 64), torch.randn(2, 5, 48)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, ctx), attn(x, encoder_hidden_states=ctx), rtol=1e-5, atol=1e-5)


def test_projections_are_the_public_fused_layout():
    fused = dda.from_diffusers(make_attention(64, 2, 32, bias=True, out_bias=True))
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = fused.projections()
    assert wq.shape == wk.shape == wv.shape == (64, 64) and wo.shape == (64, 64)
    assert wq.untyped_storage().data_ptr() == fused.attn_qkvw.untyped_storage().data_ptr()
    with torch.no_grad():
        wk.fill_(0.5)
    assert (fused.attn_qkvw[64:128] == 0.5).all()
    assert bo is fused.attn_ob


def test_unserved_family_is_listed_not_skipped():
    class OtherFamily(nn.Module):  # an attention module (processor + set_processor) no adapter serves
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(4, 4)
            self.processor = object()

        def set_processor(self, processor):
            self.processor = processor

    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Module(), nn.Module()])
    for block in model.transformer_blocks:
        block.attn = OtherFamily()
    report = dda.patch(model)
    assert report.summary()["declined"] == len(report) == 2
    assert all(r.family == unserved.NAME for r in report)
    assert all("no adapter serves" in r.reasons[0] for r in report)
    assert "transformer_blocks.0.attn" in report.names("declined")
    assert unserved.NAME in str(report)


def test_half_precision_on_the_cpu_is_declined_at_patch_time():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(scaled_down(SD15_UNET)).eval().to(torch.float16)
    report = dda.patch(unet, fuse_blocks=False)
    assert report.summary()["patched"] == 0 and report.summary()["declined"] == len(report) > 0
    assert all("float32 only" in "; ".join(r.reasons) for r in report)
    assert not any(isinstance(m, PatchedAttention) for m in unet.modules())


def test_report_names_the_family():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(scaled_down(SD15_UNET)).eval()
    report = dda.patch(unet)
    assert {r.family for r in report} == {attention_processor.NAME}
    header = str(report).splitlines()[2]
    assert header.split() == ["status", "module", "family", "reasons"]
    restored = dda.unpatch(unet)
    assert {r.family for r in restored} == {attention_processor.NAME}
