"""Issue 16's accuracy gate per model: each attention precision's model-output error against
float64, next to stock float32's and stock bfloat16's (the gate's yardstick: an 8-bit precision
passes when its error is at most 2x stock bf16's).

    python tools/precision_gate.py                    # scaled-down configs, CPU (about a minute)
    python tools/precision_gate.py --device cuda --full --dtype bfloat16   # real configs

Every row uses one model's seeded weights and one seeded input: the float64 reference is that
model cast to float64; "ours <precision>" is the model patched with
``patch(attention_precision=...)`` in ``--dtype``. On the CPU the model runs float32 (the C
references), so an 8-bit row's error is the attention quantization alone; on a GPU it adds the
bf16 model's own rounding, which is the real gate. A precision the device has no kernel for is
listed as not run, with the reason, never measured as exact.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deepspeed_diffusers_attn as dda  # noqa: E402
from deepspeed_diffusers_attn import configs, dit_example, ops  # noqa: E402

GATE = 2.0
UNETS = {"sd15": configs.SD15_UNET, "sd21": configs.SD21_UNET, "sdxl": configs.SDXL_UNET}


def _cast(value, dtype, device):
    if torch.is_tensor(value):
        value = value.to(device)
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype, device) for k, v in value.items()}
    return value


def unet_case(key: str, full: bool):
    from diffusers import UNet2DConditionModel

    config = UNETS[key] if full else configs.scaled_down(UNETS[key])
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    inputs = {"sample": torch.randn(2, 4, size, size, generator=gen), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], generator=gen)}
    if key == "sdxl":
        inputs["added_cond_kwargs"] = {k: torch.randn(s, generator=gen)
                                       for k, s in configs.sdxl_added_cond_shapes(config, 2).items()}
    return model, inputs, lambda m, x: m(**x).sample


def dit_case(key: str, full: bool):
    desc = dit_example.MODELS[key]
    config = desc.transformer if full else configs.scaled_down(desc.transformer)
    model = dit_example.build_model(config, seed=0)
    height, width, frames = (desc.height, desc.width, desc.frames) if full else (64, 64, 5 if desc.frames else None)
    inputs = dit_example.transformer_inputs(desc, config, batch=1, height=height, width=width, frames=frames)
    return model, inputs, lambda m, x: m(**x)[0]


CASES = {"sd15": unet_case, "sd21": unet_case, "sdxl": unet_case, "sd3": dit_case, "flux": dit_case, "wan": dit_case}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    d = out.double() - ref.double()
    return (d.norm() / ref.double().norm()).item()


def _in(model, dtype: torch.dtype, device: str):
    """A copy of ``model`` on ``device`` in ``dtype``: every tensor for the float64 reference, else
    as ``from_pretrained(torch_dtype=...)`` loads it (a class's float32 modules stay float32)."""
    model = copy.deepcopy(model).to(device)
    return model.double() if dtype == torch.float64 else dit_example.cast_model(model, dtype)


@torch.no_grad()
def measure(key: str, full: bool, device: str, dtype: torch.dtype) -> dict:
    model, inputs, run = CASES[key](key, full)
    ref = run(_in(model, torch.float64, device), _cast(inputs, torch.float64, device))
    row = {"model": key, "config": "full" if full else "scaled-down", "device": device, "dtype": str(dtype),
           "modules": {}}
    for name, dt in (("stock float32", torch.float32), ("stock bfloat16", torch.bfloat16)):
        row[name] = rel_err(run(_in(model, dt, device), _cast(inputs, dt, device)), ref)
    model = _in(model, dtype, device)
    x = _cast(inputs, dtype, device)
    for p in ops.attention_precisions():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report's rows say the same
            report = dda.patch(model, attention_precision=p)
        # exact: every module on our kernels (bridged ones run exact attention too)
        runs = [r for r in report if (r.status in ("patched", "bridged") if p == "exact"
                                      else r.status == "patched" and f"attention precision {p}" in r.reasons)]
        others = [f"{r.name}: {r.status}, {'; '.join(r.reasons)}" for r in report if r not in runs]
        row[f"ours {p}"] = rel_err(run(model, x), ref) if runs else "not run"
        row["modules"][p] = {"ran it": len(runs), "attention modules": len(report),
                             "first other": others[0] if others else ""}
        dda.unpatch(model)
    bf16 = row["stock bfloat16"]
    # a precision passes only where every attention module ran it, within the gate
    row["passes"] = {p: not row["modules"][p]["first other"] and isinstance(row[f"ours {p}"], float)
                     and row[f"ours {p}"] <= GATE * bf16 for p in ops.attention_precisions() if p != "exact"}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--full", action="store_true", help="the real configs (a GPU's worth of memory and time)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the float64 reference casts every module on purpose
    dtype = getattr(torch, args.dtype)
    rows = []
    for key in args.models.split(","):
        row = measure(key, args.full, args.device, dtype)
        rows.append(row)
        cells = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                          if k.startswith(("stock", "ours")))
        partial = [f"{p}: {m['ran it']} of {m['attention modules']} modules ran it; first other: {m['first other']}"
                   for p, m in row["modules"].items() if m["first other"]]
        print(f"{key}: {cells}; passes (<= {GATE:g}x stock bf16): {row['passes']}", flush=True)
        for line in partial:  # some attention modules did not run that precision
            print(f"  {line}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "precision_gate.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
