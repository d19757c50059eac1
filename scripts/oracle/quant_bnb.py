"""Oracle for core/tests/quant_bnb.rs: 4-bit quantisation by the pinned bitsandbytes on CPU.

Usage: quant_bnb.py OUT_DIR
Writes OUT_DIR/cases.safetensors (inputs and everything bnb produced) and OUT_DIR/cases.json
(the manifest). For each case `c`:
  c/w            the weight (fp32 or bf16) that both sides quantise
  c/packed       bnb's packed codes, [ceil(n/2), 1] uint8
  c/absmax_raw   the fp32 per-block absmax before any double quantisation
  c/absmax       state.absmax (fp32, or uint8 when nested)
  c/code         state.code (the 16-entry 4-bit codebook)
  c/offset, c/absmax2, c/code2   the nested state (compress_statistics=True only)
  c/deq          bnb's dequantize_4bit(packed, state)
  c/x, c/bias, c/mm              bnb.matmul_4bit(x, packed.t(), state, bias), for some cases
"""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
# bnb wraps its reference dequantisation (used for odd shapes) in torch.compile; compiling
# costs about a minute of CPU here and computes the same fp32 products, so run it eagerly.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402


def make_weight(shape, dtype, seed, special):
    g = torch.Generator().manual_seed(seed)
    rows = shape[0] if len(shape) > 1 else 1
    w = torch.randn(*shape, generator=g) * 0.02
    # Rows of very different magnitude, as in real checkpoints.
    scale = torch.exp(torch.randn(rows, generator=g) * 1.5)
    w = (w.reshape(rows, -1) * scale[:, None]).reshape(shape)
    if special:
        flat = w.reshape(-1)
        # Block 0: absmax exactly 1, so the scaled values are the inputs themselves; put every
        # NF4 and FP4 half-way point in it to pin down the tie rule.
        ties = []
        for qt in ("nf4", "fp4"):
            code = F.get_4bit_type(qt, device="cpu")
            s = torch.sort(code).values
            ties.append((s[:-1] + s[1:]) / 2)
        ties = torch.cat(ties)
        block = torch.zeros(64)
        block[0] = 1.0
        block[1 : 1 + ties.numel()] = ties
        block[1 + ties.numel() :] = torch.linspace(-1, 1, 64 - 1 - ties.numel())
        flat[:64] = block
        flat[64:128] = 0.0  # an all-zero block: absmax 0
        flat[128:192] = torch.randn(64, generator=g) * 1e-30  # tiny values
    return w.to(dtype)


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    manifest = []
    shapes = [[64, 64], [96, 200], [33, 70], [7, 13], [300, 300], [1000]]
    cases = []
    for shape in shapes:
        for dtype in ("float32", "bfloat16"):
            for qt in ("nf4", "fp4"):
                for nested in (False, True):
                    cases.append((shape, dtype, qt, nested, 64))
    for bs in (32, 128, 256, 4096):
        for qt in ("nf4", "fp4"):
            for nested in (False, True):
                cases.append(([96, 200], "float32", qt, nested, bs))

    for i, (shape, dtype, qt, nested, bs) in enumerate(cases):
        name = f"c{i:02d}"
        tdtype = getattr(torch, dtype)
        special = shape == [64, 64]
        w = make_weight(shape, tdtype, 1000 + i, special)
        packed, state = F.quantize_4bit(
            w, blocksize=bs, compress_statistics=nested, quant_type=qt
        )
        _, raw = torch.ops.bitsandbytes.quantize_4bit.default(w, bs, qt, torch.uint8)
        deq = F.dequantize_4bit(packed, state)
        tensors[f"{name}/w"] = w.contiguous()
        tensors[f"{name}/packed"] = packed.contiguous()
        tensors[f"{name}/absmax_raw"] = raw.contiguous()
        tensors[f"{name}/absmax"] = state.absmax.contiguous()
        tensors[f"{name}/code"] = state.code.contiguous()
        tensors[f"{name}/deq"] = deq.contiguous()
        if nested:
            tensors[f"{name}/offset"] = state.offset.reshape(1).float().contiguous()
            tensors[f"{name}/absmax2"] = state.state2.absmax.contiguous()
            tensors[f"{name}/code2"] = state.state2.code.contiguous()
        matmul = len(shape) == 2 and shape[0] >= 96 and bs == 64
        if matmul:
            g = torch.Generator().manual_seed(5000 + i)
            x = torch.randn(2, 5, shape[1], generator=g).to(tdtype)
            bias = torch.randn(shape[0], generator=g).to(tdtype)
            with torch.no_grad():
                mm = bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=bias)
            tensors[f"{name}/x"] = x.contiguous()
            tensors[f"{name}/bias"] = bias.contiguous()
            tensors[f"{name}/mm"] = mm.contiguous()
        manifest.append(
            {
                "name": name,
                "shape": shape,
                "dtype": dtype,
                "quant_type": qt,
                "blocksize": bs,
                "nested": nested,
                "nested_blocksize": state.state2.blocksize if nested else None,
                "matmul": matmul,
            }
        )
    save_file(tensors, os.path.join(out_dir, "cases.safetensors"))
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump({"bitsandbytes": bnb.__version__, "torch": torch.__version__, "cases": manifest}, f)


if __name__ == "__main__":
    main()
