//! `lmms-ft demo`: the quickstart. A family registered for it (`register_demo!`) writes a
//! tiny model (random weights, a word-level tokenizer over the demo's words); the demo
//! generates a dataset of coloured shapes, fine-tunes the model fully on CPU, then asks it
//! about held-out pictures and reports the accuracy. Everything goes through the same
//! registry, processor, template, trainer and generation code as a real run; only the model
//! and data are made up, so no download is needed.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use lmms_ft_core::config::{ComponentMode, Scheduler};
use lmms_ft_core::data::{Conversation, DecodedMedia, Part, Role, Turn};
use lmms_ft_core::family::{OpenOptions, PreparedConversation};
use lmms_ft_core::generate::GenerateOptions;
use lmms_ft_core::part::PerPart;
use lmms_ft_core::peft::io::save_hf_weights;
use lmms_ft_core::registry;
use lmms_ft_core::train::metrics::{self, MetricsLog};
use lmms_ft_core::train::{plot, Schedule, TrainOptions, Trainer};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind};

const SIDE: u32 = 112;
const COLORS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 40]),
    ("blue", [30, 60, 220]),
    ("yellow", [235, 200, 20]),
];
const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// The demo task's words; the family's tokenizer adds its template's and special tokens.
const WORDS: &[&str] = &[
    "What", "color", "is", "the", "shape", "?", "Which", "in", "picture", "red", "green", "blue",
    "yellow", "circle", "square", "triangle",
];

/// `lmms-ft demo`'s flags.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Where the model, data samples and trained weights go.
    #[arg(
        long,
        alias = "out",
        value_name = "DIR",
        default_value = "lmms-ft-demo"
    )]
    pub output_dir: PathBuf,
    /// The family whose tiny model to train (default: the first registered for the demo).
    #[arg(long)]
    pub family: Option<String>,
    #[arg(long, default_value_t = 500)]
    pub steps: u64,
    #[arg(long, default_value_t = 2000)]
    pub train_samples: usize,
    #[arg(long, default_value_t = 100)]
    pub test_samples: usize,
    #[arg(long, default_value_t = 0)]
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

fn prepared(s: &Shape, q: &str, answer: Option<&str>) -> PreparedConversation {
    PreparedConversation {
        conversation: conversation(q, answer),
        media: DecodedMedia {
            images: vec![s.image.clone()],
            videos: Vec::new(),
        },
    }
}

pub fn run(opts: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let demos = registry::demos();
    let demo = match &opts.family {
        Some(name) => demos.iter().find(|d| d.name == name.as_str()),
        None => demos.first(),
    }
    .with_context(|| {
        format!(
            "no demo model {}is linked into this binary (registered: {})",
            opts.family
                .as_ref()
                .map(|n| format!("`{n}` "))
                .unwrap_or_default(),
            demos.iter().map(|d| d.name).collect::<Vec<_>>().join(", ")
        )
    })?;
    let model_dir = opts.output_dir.join(format!("tiny-{}", demo.name));
    (demo.write_model)(&model_dir, WORDS, SIDE, opts.seed)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let train: Vec<(Shape, bool)> = (0..opts.train_samples)
        .map(|i| (draw(&mut rng), i % 2 == 0))
        .collect();
    let test: Vec<(Shape, bool)> = (0..opts.test_samples)
        .map(|i| (draw(&mut rng), i % 2 == 0))
        .collect();
    let samples_dir = opts.output_dir.join("held-out");
    std::fs::create_dir_all(&samples_dir)?;
    for (i, (s, _)) in test.iter().take(6).enumerate() {
        s.image
            .save(samples_dir.join(format!("{i}-{}-{}.png", s.color, s.shape)))?;
    }
    println!(
        "demo: tiny {} in {} ({} train / {} held-out pictures of coloured shapes)",
        demo.name,
        model_dir.display(),
        train.len(),
        test.len()
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json"))?)?;
    let family = registry::family_for_config(&json)?;
    let implementation = family
        .implementation
        .with_context(|| format!("the {} family has no implementation", family.name))?;
    let mut pipeline = implementation.open(
        &model_dir,
        OpenOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            processor: Default::default(),
        },
        None,
    )?;
    let options = TrainOptions {
        modes: PerPart::splat(ComponentMode::Full),
        lora: None,
        lrs: PerPart::splat(3e-3),
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
    let trained = opts.output_dir.join(format!("tiny-{}-trained", demo.name));
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
