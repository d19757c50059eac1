//! `lmms-ft demo`: the quickstart. Builds a tiny Qwen2-VL (random weights, a word-level
//! tokenizer, a ChatML template) and a generated dataset of coloured shapes, fine-tunes it
//! fully on CPU, then asks it about held-out pictures and reports the accuracy. Everything
//! goes through the same registry, processor, template, trainer and generation code as a
//! real run; only the model and data are made up, so no download is needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use lmms_ft_core::config::{ComponentMode, Scheduler};
use lmms_ft_core::data::{Conversation, DecodedMedia, Part, Role, Turn};
use lmms_ft_core::family::{OpenOptions, PreparedConversation};
use lmms_ft_core::generate::GenerateOptions;
use lmms_ft_core::nn::ParamInit;
use lmms_ft_core::peft::io::save_hf_weights;
use lmms_ft_core::registry;
use lmms_ft_core::train::metrics::{self, MetricsLog};
use lmms_ft_core::train::{plot, Schedule, TrainOptions, Trainer};
use lmms_ft_qwen2_vl::config::Qwen2VlConfig;
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Tokenizer};

const SIDE: u32 = 112;
const COLORS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 40]),
    ("blue", [30, 60, 220]),
    ("yellow", [235, 200, 20]),
];
const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const SPECIAL: [&str; 8] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
];
const WORDS: &[&str] = &[
    "system",
    "user",
    "assistant",
    "You",
    "are",
    "a",
    "helpful",
    ".",
    "What",
    "color",
    "is",
    "the",
    "shape",
    "?",
    "Which",
    "in",
    "picture",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
];
/// ChatML as Qwen2-VL writes it, with its default system prompt.
const TEMPLATE: &str = "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

pub struct DemoOptions {
    pub out: PathBuf,
    pub steps: u64,
    pub train_samples: usize,
    pub test_samples: usize,
    pub seed: u64,
}

/// One picture and what is in it.
struct Shape {
    image: RgbImage,
    color: &'static str,
    shape: &'static str,
}

fn draw(rng: &mut ChaCha8Rng) -> Shape {
    let (color, rgb) = *COLORS.choose(rng).expect("non-empty");
    let shape = *SHAPES.choose(rng).expect("non-empty");
    // Near the centre with a little jitter in place and size: enough variety that the model
    // cannot memorise pixels, little enough that a tiny model learns shapes in minutes.
    let r = rng.random_range(42..50) as f32;
    let cx = (SIDE / 2) as f32 + rng.random_range(-3.0..3.0);
    let cy = (SIDE / 2) as f32 + rng.random_range(-3.0..3.0);
    let image = RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let inside = match shape {
            "circle" => dx * dx + dy * dy <= r * r,
            "square" => dx.abs() <= r * 0.9 && dy.abs() <= r * 0.9,
            // Upward triangle: below the apex, above the base, within the widening sides.
            _ => dy >= -r && dy <= r * 0.8 && dx.abs() <= (dy + r) * 0.6,
        };
        if inside {
            Rgb(rgb)
        } else {
            Rgb([245, 245, 240])
        }
    });
    Shape {
        image,
        color,
        shape,
    }
}

fn question(s: &Shape, ask_color: bool) -> (String, &'static str) {
    if ask_color {
        ("What color is the shape?".into(), s.color)
    } else {
        ("Which shape is in the picture?".into(), s.shape)
    }
}

fn conversation(q: &str, answer: Option<&str>) -> Conversation {
    let mut turns = vec![Turn {
        role: Role::User,
        parts: vec![
            Part::Image { index: 0 },
            Part::Text {
                text: q.to_string(),
            },
        ],
    }];
    if let Some(a) = answer {
        turns.push(Turn::text(Role::Assistant, a));
    }
    Conversation { turns }
}

/// Writes the tiny model directory: config, tokenizer, template, processor config and random
/// weights, in the layout a Hub Qwen2-VL checkpoint has.
fn write_model(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for w in SPECIAL.iter().chain(WORDS) {
        let n = vocab.len() as u32;
        vocab.entry(w.to_string()).or_insert(n);
    }
    let model = WordLevel::builder()
        .vocab(vocab.clone().into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| anyhow::anyhow!("building the demo tokenizer: {e}"))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    let special: Vec<AddedToken> = SPECIAL.iter().map(|t| AddedToken::from(*t, true)).collect();
    tokenizer.add_special_tokens(&special);
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("saving the demo tokenizer: {e}"))?;
    let id = |t: &str| vocab[t];
    let json = |name: &str, value: serde_json::Value| -> Result<()> {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {name}"))
    };
    json(
        "tokenizer_config.json",
        serde_json::json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}),
    )?;
    std::fs::write(dir.join("chat_template.jinja"), TEMPLATE)?;
    json(
        "preprocessor_config.json",
        serde_json::json!({
            "min_pixels": SIDE * SIDE, "max_pixels": SIDE * SIDE, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"
        }),
    )?;
    json(
        "generation_config.json",
        serde_json::json!({"eos_token_id": [id("<|im_end|>")]}),
    )?;
    let config = serde_json::json!({
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vocab_size": vocab.len(),
        "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]},
        "tie_word_embeddings": false,
        "image_token_id": id("<|image_pad|>"), "video_token_id": id("<|video_pad|>"),
        "vision_start_token_id": id("<|vision_start|>"), "vision_end_token_id": id("<|vision_end|>"),
        "bos_token_id": id("<|endoftext|>"), "eos_token_id": id("<|im_end|>"),
        "vision_config": {"depth": 3, "embed_dim": 96, "hidden_size": 96, "num_heads": 4,
                          "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "quick_gelu"}
    });
    json("config.json", config.clone())?;
    let parsed = <Qwen2VlConfig as lmms_ft_core::family::HfConfig>::from_hf_json(&config)?;
    tch::manual_seed(seed as i64);
    let model = Qwen2VlModel::new(&parsed, Device::Cpu, ParamInit::Normal { std: 0.02 });
    save_hf_weights(&model, dir, usize::MAX)
}

fn prepared(s: &Shape, q: &str, answer: Option<&str>) -> PreparedConversation {
    PreparedConversation {
        conversation: conversation(q, answer),
        media: DecodedMedia {
            images: vec![s.image.clone()],
            videos: Vec::new(),
        },
    }
}

pub fn run(opts: &DemoOptions) -> Result<()> {
    let started = Instant::now();
    let model_dir = opts.out.join("tiny-qwen2-vl");
    write_model(&model_dir, opts.seed)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let train: Vec<(Shape, bool)> = (0..opts.train_samples)
        .map(|i| (draw(&mut rng), i % 2 == 0))
        .collect();
    let test: Vec<(Shape, bool)> = (0..opts.test_samples)
        .map(|i| (draw(&mut rng), i % 2 == 0))
        .collect();
    let samples_dir = opts.out.join("held-out");
    std::fs::create_dir_all(&samples_dir)?;
    for (i, (s, _)) in test.iter().take(6).enumerate() {
        s.image
            .save(samples_dir.join(format!("{i}-{}-{}.png", s.color, s.shape)))?;
    }
    println!(
        "demo: tiny Qwen2-VL in {} ({} train / {} held-out pictures of coloured shapes)",
        model_dir.display(),
        train.len(),
        test.len()
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json"))?)?;
    let family = registry::family_for_config(&json)?;
    let implementation = family
        .implementation
        .context("the qwen2-vl family is not linked into this binary")?;
    let mut pipeline = implementation.open(
        &model_dir,
        OpenOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            processor: Default::default(),
        },
    )?;
    let options = TrainOptions {
        modes: [ComponentMode::Full; 3],
        lora: None,
        lrs: [3e-3; 3],
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        max_grad_norm: 1.0,
        schedule: Schedule::with_ratio(Scheduler::Cosine, 0.05, opts.steps),
        seed: opts.seed,
    };
    let mut trainer = Trainer::new(pipeline.trainable(), options)?;
    // The same metrics file and plot as `lmms-ft train` writes, beside the trained weights.
    let trained = opts.out.join("tiny-qwen2-vl-trained");
    if trained.join(metrics::FILE).is_file() {
        std::fs::remove_file(trained.join(metrics::FILE))?;
    }
    let mut log = MetricsLog::open(&trained)?;
    let batch_size = 16;
    let mut order = ChaCha8Rng::seed_from_u64(opts.seed + 1);
    let mut first = None;
    let mut last = f64::NAN;
    let mut recent = Vec::new();
    for step in 1..=opts.steps {
        let batch: Vec<PreparedConversation> = (0..batch_size)
            .map(|_| {
                let (s, ask_color) = &train[order.random_range(0..train.len())];
                let (q, a) = question(s, *ask_color);
                prepared(s, &q, Some(a))
            })
            .collect();
        let stats = trainer.train_step(&[batch], |b| pipeline.forward(b, true))?;
        log.log(&stats)?;
        first.get_or_insert(stats.loss);
        last = stats.loss;
        recent.push(stats.loss);
        if step % 25 == 0 || step == opts.steps {
            let mean = recent.iter().sum::<f64>() / recent.len() as f64;
            println!(
                "step {step:>4}/{}  loss {mean:.4}  lr {:.2e}",
                opts.steps, stats.lr
            );
            recent.clear();
        }
    }
    trainer.set_training(false);

    let gen = GenerateOptions {
        max_new_tokens: 4,
        ..Default::default()
    };
    let mut correct = 0;
    for (i, (s, ask_color)) in test.iter().enumerate() {
        let (q, expected) = question(s, *ask_color);
        let reply = pipeline.generate(&prepared(s, &q, None), &gen)?;
        let ok = reply.text.trim() == expected;
        correct += ok as usize;
        if i < 6 {
            println!(
                "  {q:<32} expected {expected:<9} got {:<12} {}",
                reply.text.trim(),
                if ok { "ok" } else { "WRONG" }
            );
        }
    }
    let accuracy = correct as f64 / test.len() as f64;
    let (train_loss, eval_loss) = plot::series(&metrics::read_rows(log.path())?);
    let plot_path = trained.join("loss.png");
    plot::plot_losses(&train_loss, &eval_loss, &plot_path)?;
    save_hf_weights(pipeline.trainable(), &trained, usize::MAX)?;
    lmms_ft_core::peft::io::copy_model_files(&model_dir, &trained)?;
    println!("demo: loss plot in {}", plot_path.display());
    println!(
        "demo: loss {:.3} → {:.3}; held-out accuracy {correct}/{} = {:.1}%; trained model in {} ({:.0} s)",
        first.unwrap_or(f64::NAN),
        last,
        test.len(),
        accuracy * 100.0,
        trained.display(),
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        accuracy >= 0.9,
        "held-out accuracy {:.1}% is below 90%",
        accuracy * 100.0
    );
    Ok(())
}
