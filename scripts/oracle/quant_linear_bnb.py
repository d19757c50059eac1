"""Oracle for core/tests/quant_linear.rs: forward and input gradient of the pinned
bitsandbytes' `Linear4bit` on CPU (the QLoRA base layer), with the weight it quantised.

Usage: quant_linear_bnb.py OUT_DIR
Writes OUT_DIR/cases.safetensors and OUT_DIR/cases.json. For each case `c`:
  c/w        the fp32 weight bnb quantised (Params4bit)
  c/packed   bnb's packed codes after quantisation
  c/bias     the layer's bias
  c/x        the input, c/g the gradient fed into the output
  c/y        Linear4bit(x) (computed in the case's compute dtype, cast back to x's dtype)
  c/x_grad   d(sum(y * g))/dx through bnb's MatMul4Bit backward
"""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import bitsandbytes as bnb  # noqa: E402


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    manifest = []
    i = 0
    for qt in ("nf4", "fp4"):
        for nested in (False, True):
            for compute in ("float32", "bfloat16"):
                name = f"c{i}"
                i += 1
                out_f, in_f = (96, 200) if compute == "float32" else (64, 128)
                g = torch.Generator().manual_seed(100 + i)
                w = torch.randn(out_f, in_f, generator=g) * 0.05
                bias = torch.randn(out_f, generator=g) * 0.1
                x = torch.randn(2, 5, in_f, generator=g)
                go = torch.randn(2, 5, out_f, generator=g)
                cdtype = getattr(torch, compute)
                lin = bnb.nn.Linear4bit(
                    in_f,
                    out_f,
                    bias=True,
                    compute_dtype=cdtype,
                    compress_statistics=nested,
                    quant_type=qt,
                )
                lin.weight = bnb.nn.Params4bit(
                    w.clone(),
                    requires_grad=False,
                    compress_statistics=nested,
                    quant_type=qt,
                    blocksize=64,
                )
                lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
                lin = lin.to("cpu")
                assert lin.weight.bnb_quantized, "bnb did not quantise the weight"
                xr = x.clone().requires_grad_(True)
                y = lin(xr)
                (y * go).sum().backward()
                tensors[f"{name}/w"] = w
                tensors[f"{name}/packed"] = lin.weight.data.contiguous()
                tensors[f"{name}/bias"] = bias
                tensors[f"{name}/x"] = x
                tensors[f"{name}/g"] = go
                tensors[f"{name}/y"] = y.detach().contiguous()
                tensors[f"{name}/x_grad"] = xr.grad.contiguous()
                manifest.append(
                    {"name": name, "quant_type": qt, "nested": nested, "compute": compute}
                )
    save_file(tensors, os.path.join(out_dir, "cases.safetensors"))
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump({"bitsandbytes": bnb.__version__, "cases": manifest}, f)


if __name__ == "__main__":
    main()
