"""LoRA training throughput: transformers + peft + a plain PyTorch AdamW loop, the reference
side of `scripts/bench/train_throughput.sh` (which also runs lmms-ft's
`train_throughput` example on the same checkpoint and inputs and prints the table).

Usage:
  python train_throughput.py make DIR
      A random Qwen2-VL-shaped model (8 decoder layers, hidden 512, the real Qwen2-VL
      vocabulary of 151,936 tokens and its special-token ids, untied lm_head, 4 vision blocks)
      saved with `save_pretrained`, and DIR/inputs.safetensors: SAMPLES training samples of
      250-600 tokens, each with one or two photo-sized pictures (640x480 to 1600x1200) run
      through transformers' Qwen2-VL image processor at max_pixels = 256*28*28 (the budget
      of Qwen2-VL's README, at most 256 tokens per image), a 16-48-token prompt and an answer
      filling the rest (at least 24 tokens), the answer alone labeled; with processor pixel
      values, grids, 3-D rope position ids and labels. DIR/samples.json describes them.
  python train_throughput.py run DIR STEPS WARMUP THREADS
      LoRA (r 8, alpha 16, dropout 0.05 on every linear of the language model, lm_head
      excluded), AdamW lr 1e-4, cosine schedule, clipping at 1.0, batch 1, step s on sample
      s mod SAMPLES; times every optimiser step (forward, backward, clip, step, zero_grad) and
      prints one JSON line with the step times after WARMUP steps, the losses and VmHWM.
  python train_throughput.py table TRANSFORMERS_JSON LMMS_FT_JSON
      The comparison table (each file may hold several runs, one JSON line each).
"""

import json
import os
import statistics
import sys
import time

HIDDEN, LAYERS, VOCAB = 512, 8, 151936
# Qwen2-VL's own ids (config.json of Qwen/Qwen2-VL-2B-Instruct).
VISION_START, VISION_END, IMAGE_TOKEN, VIDEO_TOKEN = 151652, 151653, 151655, 151656
BOS, EOS = 151643, 151645
SAMPLES = 8
MAX_PIXELS = 256 * 28 * 28
PHOTO_SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (768, 1024), (1080, 1440)]
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.05


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
                           video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END, bos_token_id=BOS, eos_token_id=EOS, **text)
    model = Qwen2VLForConditionalGeneration(config).float().eval()
    model.save_pretrained(out)

    rng = np.random.default_rng(0)
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=MAX_PIXELS)
    tensors, described = {}, []
    while len(described) < SAMPLES:
        n_images = int(rng.integers(1, 3))
        images = []
        for _ in range(n_images):
            w, h = PHOTO_SIZES[int(rng.integers(len(PHOTO_SIZES)))]
            # A smooth picture (a coarse random grid upsampled), so the resize works on
            # photo-like content rather than white noise; the step time does not depend on it.
            coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
            images.append(coarse.resize((w, h), Image.BICUBIC))
        pix = proc(images=images, return_tensors="pt")
        grid = pix["image_grid_thw"]
        per_image = [int(g.prod()) // 4 for g in grid]
        media = sum(n + 2 for n in per_image)
        prompt_len = int(rng.integers(16, 49))
        total = int(rng.integers(250, 601))
        answer_len = total - media - prompt_len
        if answer_len < 24:
            continue
        rand = lambda n: torch.randint(0, BOS, (n,))
        parts = [rand(prompt_len // 2)]
        for n in per_image:
            parts += [torch.tensor([VISION_START]), torch.full((n,), IMAGE_TOKEN), torch.tensor([VISION_END])]
        answer = rand(answer_len)
        parts += [rand(prompt_len - prompt_len // 2), answer]
        ids = torch.cat(parts).view(1, -1)
        labels = torch.full_like(ids, -100)
        labels[0, -answer_len:] = answer
        types = (ids == IMAGE_TOKEN).int()
        with torch.no_grad():
            pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
        i = len(described)
        for k, v in {"input_ids": ids, "labels": labels, "position_ids": pos,
                     "pixel_values": pix["pixel_values"], "image_grid_thw": grid}.items():
            tensors[f"{i}.{k}"] = v.contiguous()
        described.append({"tokens": ids.shape[1], "images": [list(im.size) for im in images],
                          "image_tokens": per_image, "labels": answer_len})
    save_file(tensors, os.path.join(out, "inputs.safetensors"))
    with open(os.path.join(out, "samples.json"), "w") as f:
        json.dump(described, f)
    tokens = sum(d["tokens"] for d in described)
    print(json.dumps({"samples": len(described), "tokens": tokens,
                      "labeled_fraction": sum(d["labels"] for d in described) / tokens}))


def run(out, steps, warmup, threads):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration, get_cosine_schedule_with_warmup

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    inputs = load_file(os.path.join(out, "inputs.safetensors"))
    n = len(json.load(open(os.path.join(out, "samples.json"))))
    model = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                     target_modules=r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=steps)
    times, cpu, losses, tokens = [], [], [], []
    for s in range(steps):
        i = s % n
        kw = {k: inputs[f"{i}.{k}"] for k in ("input_ids", "position_ids", "pixel_values", "image_grid_thw")}
        t0, c0 = time.perf_counter(), cpu_seconds()
        loss = model(**kw, labels=inputs[f"{i}.labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
        tokens.append(int(kw["input_ids"].shape[1]))
    print(json.dumps({"side": "transformers+peft", "threads": torch.get_num_threads(),
                      "tokens": tokens[warmup:], "trainable": sum(p.numel() for p in params), "warmup": warmup,
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
        r["tokens"] = [t for x in runs for t in x["tokens"]]
        r["peak_rss_mib"] = max(x["peak_rss_mib"] for x in runs)
        r["runs"] = len(runs)
        if any(x["loss"][0] != runs[0]["loss"][0] for x in runs):
            sys.exit(f"{path}: runs of the same side start from different losses")
        return r

    theirs, ours = pooled(theirs_path), pooled(ours_path)
    if theirs["tokens"] != ours["tokens"]:
        sys.exit("the two sides timed steps on different samples")
    print(f"runs per side: {theirs['runs']} / {ours['runs']}; steps below are pooled over them "
          f"(the same samples on both sides, {statistics.mean(theirs['tokens']):.0f} tokens per step on average)")
    rows = []
    for r in (theirs, ours):
        rows.append((r["side"], r["threads"], r["trainable"], len(r["step_s"]),
                     statistics.median(r["step_s"]), statistics.mean(r["step_s"]),
                     statistics.median(r["cpu_s"]), r["peak_rss_mib"]))
    print(f"{'side':<20} {'threads':>7} {'trainable':>10} {'steps':>5} {'median s/step':>13} "
          f"{'mean s/step':>11} {'median CPU s/step':>17} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r[0]:<20} {r[1]:>7} {r[2]:>10} {r[3]:>5} {r[4]:>13.3f} {r[5]:>11.3f} {r[6]:>17.2f} {r[7]:>12.0f}")
    print(f"ratio lmms-ft / transformers+peft: step time {rows[1][5] / rows[0][5]:.2f} (mean over the same steps; "
          f"median {rows[1][4] / rows[0][4]:.2f}), CPU time per step (median) {rows[1][6] / rows[0][6]:.2f}, "
          f"peak RSS {rows[1][7] / rows[0][7]:.2f}")
    if ours.get("peak_rss_after_load_mib"):
        print(f"lmms-ft peak RSS right after loading the model: {ours['peak_rss_after_load_mib']:.0f} MiB")
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
