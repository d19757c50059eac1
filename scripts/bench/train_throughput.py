"""LoRA training throughput: transformers + peft + a plain PyTorch AdamW loop, the reference
side of `scripts/bench/train_throughput.sh` (which also runs lmms-ft's
`train_throughput` example on the same checkpoint and inputs and prints the table).

Usage:
  python train_throughput.py make DIR
      A random small Qwen2-VL (8 decoder layers, hidden 512, 4 vision blocks) saved with
      `save_pretrained`, and DIR/inputs.safetensors: one training sample of a 336x336 image
      (144 merged image tokens) inside ~400 tokens, with processor pixel values, grid,
      3-D rope position ids and labels (the last 200 tokens).
  python train_throughput.py run DIR STEPS WARMUP THREADS
      LoRA (r 16, alpha 32, dropout 0.05 on every linear of the language model, lm_head
      excluded), AdamW lr 1e-4, cosine schedule, clipping at 1.0, batch 1; times every
      optimiser step (forward, backward, clip, step, zero_grad) and prints one JSON line with
      the step times after WARMUP steps, the losses and VmHWM.
  python train_throughput.py table TRANSFORMERS_JSON LMMS_FT_JSON
      The comparison table (each file may hold several runs, one JSON line each).
"""

import json
import os
import statistics
import sys
import time

HIDDEN, LAYERS, VOCAB = 512, 8, 32000
IMAGE_TOKEN, VISION_START, VISION_END = VOCAB - 3, VOCAB - 5, VOCAB - 4


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def cpu_seconds():
    """User + system CPU time of this process from /proc/self/stat, the same source the Rust
    side reads: on a machine other jobs share, CPU time per step moves much less than wall
    time."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make(out):
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=1536, num_hidden_layers=LAYERS,
                num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, rope_theta=1000000.0)
    vision = dict(depth=4, embed_dim=384, hidden_size=HIDDEN, num_heads=6, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")
    config = Qwen2VLConfig(vision_config=vision, tie_word_embeddings=False, image_token_id=IMAGE_TOKEN,
                           video_token_id=VOCAB - 2, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END, bos_token_id=VOCAB - 7, eos_token_id=VOCAB - 6, **text)
    model = Qwen2VLForConditionalGeneration(config).float().eval()
    model.save_pretrained(out)

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=336 * 336)
    pix = proc(images=[image], return_tensors="pt")
    grid = pix["image_grid_thw"]
    n_image = int(grid.prod()) // 4
    prompt = torch.randint(0, VOCAB - 10, (48,))
    answer = torch.randint(0, VOCAB - 10, (200,))
    ids = torch.cat([prompt[:8], torch.tensor([VISION_START]), torch.full((n_image,), IMAGE_TOKEN),
                     torch.tensor([VISION_END]), prompt[8:], answer]).view(1, -1)
    labels = torch.full_like(ids, -100)
    labels[0, -answer.numel():] = answer
    types = (ids == IMAGE_TOKEN).int()
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
    save_file({"input_ids": ids.contiguous(), "labels": labels.contiguous(), "position_ids": pos.contiguous(),
               "pixel_values": pix["pixel_values"].contiguous(), "image_grid_thw": grid.contiguous()},
              os.path.join(out, "inputs.safetensors"))
    print(json.dumps({"tokens": ids.shape[1], "image_tokens": n_image, "patches": pix["pixel_values"].shape[0]}))


def run(out, steps, warmup, threads):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration, get_cosine_schedule_with_warmup

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    inputs = load_file(os.path.join(out, "inputs.safetensors"))
    model = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                     target_modules=r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=steps)
    kw = {k: inputs[k] for k in ("input_ids", "position_ids", "pixel_values", "image_grid_thw")}
    times, cpu, losses = [], [], []
    for s in range(steps):
        t0, c0 = time.perf_counter(), cpu_seconds()
        loss = model(**kw, labels=inputs["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    print(json.dumps({"side": "transformers+peft", "threads": torch.get_num_threads(),
                      "tokens": int(inputs["input_ids"].shape[1]),
                      "trainable": sum(p.numel() for p in params), "warmup": warmup,
                      "step_s": times[warmup:], "cpu_s": cpu[warmup:], "loss": losses, "peak_rss_mib": peak_rss_mib()}))


def table(theirs_path, ours_path):
    def pooled(path):
        """Every run of one side (the driver alternates the sides over several rounds, so a
        change in the machine's load hits both): step times pooled, the highest VmHWM."""
        with open(path) as f:
            runs = [json.loads(l) for l in f.read().splitlines() if l.startswith("{")]
        r = dict(runs[0])
        r["step_s"] = [t for x in runs for t in x["step_s"]]
        r["cpu_s"] = [t for x in runs for t in x["cpu_s"]]
        r["peak_rss_mib"] = max(x["peak_rss_mib"] for x in runs)
        r["runs"] = len(runs)
        if any(x["loss"][0] != runs[0]["loss"][0] for x in runs):
            sys.exit(f"{path}: runs of the same side start from different losses")
        return r

    theirs, ours = pooled(theirs_path), pooled(ours_path)
    print(f"runs per side: {theirs['runs']} / {ours['runs']}; steps below are pooled over them")
    rows = []
    for r in (theirs, ours):
        rows.append((r["side"], r["threads"], r["tokens"], r["trainable"], len(r["step_s"]),
                     statistics.median(r["step_s"]), statistics.mean(r["step_s"]),
                     statistics.median(r["cpu_s"]), r["peak_rss_mib"]))
    print(f"{'side':<20} {'threads':>7} {'tokens':>6} {'trainable':>10} {'steps':>5} {'median s/step':>13} "
          f"{'mean s/step':>11} {'median CPU s/step':>17} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r[0]:<20} {r[1]:>7} {r[2]:>6} {r[3]:>10} {r[4]:>5} {r[5]:>13.3f} {r[6]:>11.3f} {r[7]:>17.2f} "
              f"{r[8]:>12.0f}")
    print(f"ratio lmms-ft / transformers+peft: step time (median) {rows[1][5] / rows[0][5]:.2f}, "
          f"CPU time per step (median) {rows[1][7] / rows[0][7]:.2f}, peak RSS {rows[1][8] / rows[0][8]:.2f}")
    # Same base model and data with lora_B = 0: the first losses must agree, or the two
    # sides are not running the same step.
    print(f"first-step loss: transformers+peft {theirs['loss'][0]:.6f}, lmms-ft {ours['loss'][0]:.6f}")
    if abs(theirs["loss"][0] - ours["loss"][0]) > 1e-4 * abs(theirs["loss"][0]):
        sys.exit("the first-step losses differ: the two sides do not run the same model and data")
    if theirs["trainable"] != ours["trainable"]:
        sys.exit("the two sides train different numbers of parameters")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        os.makedirs(sys.argv[2], exist_ok=True)
        make(sys.argv[2])
    elif cmd == "run":
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "table":
        table(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
