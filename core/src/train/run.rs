//! A whole training run (`lmms-ft train`), for any registered family: data screening and
//! background loading, the optimiser loop, logging, evaluation, checkpoints, resume,
//! interruption, and the output directory.
//!
//! Data flows in two stages. A streaming pass reads every record once and screens its
//! structure and that its media files exist (cheap: nothing is decoded), under
//! `data.on_bad_sample`; this also gives the dataset length the sampler needs for JSONL.
//! Decoding, encoding, length fitting and collation happen lazily on loader threads, where a
//! file that turns out to be undecodable is again skipped or stops the run per
//! `on_bad_sample`, while `data.overlength` governs samples longer than `data.max_length`.
//!
//! Resuming is exact: the checkpoint stores the sampler position (epoch, batches consumed),
//! and each epoch's order is a pure function of the seed, so the resumed run sees the same
//! batches in the same order; per-step seeding gives it the same dropout masks.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind};

use super::batches::BatchLoad;
use super::identity::{ResumeState, RunIdentity};
use super::metrics::{self, MetricsLog};
use super::{outdir, plot, StepStats, TrainOptions, Trainer};
use crate::config::{ComponentMode, Config, DataSection, Mode, OnBadSample, TrainSection};
use crate::data::batch::sampler::{
    BatchSampler, LengthGroupedSampler, SamplerState, ShuffledSampler,
};
use crate::data::dataset::{Dataset, Record};
use crate::data::loader::{Loader, LoaderOptions};
use crate::data::prepare::{dataset_options, prepare, MediaOptions};
use crate::data::validate::{screen_record, Checks, MediaCheck, Problem};
use crate::eval::answers::generate_answers;
use crate::eval::evaluate;
use crate::family::{DynFamily, LoadedBatch, OpenOptions, Pipeline, ProcessorOptions};
use crate::generate::GenerateOptions;
use crate::loss::LossHead;
use crate::peft::io::{copy_model_files, save_adapter, save_hf_weights};
use crate::quant::QuantSpec;

/// Name of the resolved configuration written into the output directory.
pub const CONFIG_FILE: &str = "lmms-ft-config.toml";

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Trained to the last step and wrote the output directory.
    Finished { steps: u64, output_dir: PathBuf },
    /// Stopped by SIGINT; a checkpoint of the last completed step was saved.
    Interrupted { step: u64, checkpoint: PathBuf },
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs (once per process) a SIGINT handler that asks the loop to stop after the current
/// step; a second Ctrl-C exits at once, for a run stuck in a long step.
fn install_interrupt_handler() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let result = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("second interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!(
                "interrupt: saving a checkpoint after the current step (Ctrl-C again to quit now)"
            );
        });
        if let Err(e) = result {
            tracing::warn!(
                "cannot catch Ctrl-C ({e}); an interrupt will stop without a checkpoint"
            );
        }
    });
}

/// Reads and screens every record of a dataset file (structure, media existence).
pub fn read_records(path: &Path, data: &DataSection) -> Result<Vec<Record>> {
    let dataset = Dataset::open(path, dataset_options(data))?;
    let checks = Checks {
        media: MediaCheck::Exists,
        video_check: None,
        token_length: None,
        max_length: None,
    };
    let mut records = Vec::new();
    let mut skipped = 0usize;
    for item in dataset.records()? {
        let screened = match item {
            Ok(record) => screen_record(record, &checks, data.on_bad_sample),
            Err(e) => {
                let problem = Problem::from(e);
                match data.on_bad_sample {
                    OnBadSample::Error => Err(problem),
                    OnBadSample::Skip => {
                        tracing::warn!("skipping sample: {problem}");
                        Ok(None)
                    }
                }
            }
        };
        match screened {
            Ok(Some(record)) => records.push(record),
            Ok(None) => skipped += 1,
            Err(problem) => bail!(
                "bad sample: {problem} (set data.on_bad_sample = \"skip\" to train without such samples)"
            ),
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            kept = records.len(),
            "left out bad samples of {}",
            path.display()
        );
    }
    ensure!(
        !records.is_empty(),
        "{} has no usable samples",
        path.display()
    );
    Ok(records)
}

/// Progress on a terminal (a bar), structured log lines otherwise.
struct Reporter {
    bar: Option<ProgressBar>,
}

impl Reporter {
    fn new(total: u64, start: u64) -> Reporter {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            ) {
                bar.set_style(style);
            }
            bar.set_position(start);
            bar
        });
        Reporter { bar }
    }

    /// A finished step; its stats when the loop read them (logged or checkpointed steps).
    fn step(&self, step: u64, stats: Option<&StepStats>, log: bool) {
        let Some(s) = stats else {
            if let Some(bar) = &self.bar {
                bar.set_position(step);
            }
            return;
        };
        match &self.bar {
            Some(bar) => {
                bar.set_position(s.step);
                bar.set_message(format!("loss {:.4}  lr {:.3e}", s.loss, s.lr));
            }
            None if log => tracing::info!(
                step = s.step,
                loss = s.loss,
                lr = s.lr,
                grad_norm = s.grad_norm,
                "train"
            ),
            None => {}
        }
    }

    /// Logs around the bar so the two do not garble each other.
    fn info<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Eval loss and, with `train.eval_generate_samples`, the scores of greedy answers to the
/// first eval samples, logged to `metrics.jsonl`.
fn evaluate_and_log(
    cfg: &Config,
    pipeline: &dyn Pipeline,
    trainer: &Trainer,
    eval: &BatchLoad,
    metrics: &mut MetricsLog,
    step: u64,
) -> Result<()> {
    let t = &cfg.train;
    trainer.set_training(false);
    let report = evaluate(pipeline, eval, t.batch_size);
    trainer.set_training(true);
    let report = report?;
    let (loss, tokens) = (report.mean_loss, report.num_label_tokens);
    metrics.log_eval(step, loss, tokens)?;
    tracing::info!(step, eval_loss = loss, "eval");
    let n = t.eval_generate_samples.min(eval.records.len());
    if n == 0 {
        return Ok(());
    }
    let records: Vec<(usize, Record)> = eval.records[..n].iter().cloned().enumerate().collect();
    let opts = GenerateOptions {
        max_new_tokens: t.eval_max_new_tokens,
        ..GenerateOptions::default()
    };
    trainer.set_training(false);
    let answers = generate_answers(pipeline, &records, &eval.media, &opts, t.batch_size);
    trainer.set_training(true);
    let answers = answers.context("generating answers for the eval samples")?;
    metrics.log_eval_generation(step, &answers.mean, answers.num_samples)?;
    tracing::info!(
        step,
        exact_match = answers.mean.exact_match,
        token_f1 = answers.mean.token_f1,
        rouge_l = answers.mean.rouge_l,
        "eval generation"
    );
    Ok(())
}

/// Runs training as `cfg` says on the model in `model_dir`.
pub fn train(
    cfg: &Config,
    family: &dyn DynFamily,
    model_dir: &Path,
    device: Device,
    kind: Kind,
) -> Result<Outcome> {
    let t = &cfg.train;
    check_settings(t)?;
    let out = t.output_dir.clone();
    let train_path = cfg
        .data
        .train
        .as_ref()
        .context("no dataset given: pass --data FILE (or set data.train in the config)")?;
    let prepared = outdir::prepare(cfg, model_dir)?;
    let resume = prepared.resume.clone();
    let mut pipeline = open_pipeline(cfg, family, model_dir, device, kind)?;
    let (records, sampler) = sampler(cfg, read_records(train_path, &cfg.data)?, &*pipeline)?;
    let num_records = records.len();
    let batches_per_epoch = sampler.epoch_batches(0).len();
    ensure!(batches_per_epoch > 0, "the training data has no batches");
    let total = total_steps(t, batches_per_epoch)?;

    let builder = pipeline.batch_builder();
    let eval = match &cfg.data.eval {
        Some(path) => Some(BatchLoad::new(
            read_records(path, &cfg.data)?,
            builder.clone(),
            &cfg.data,
            device,
        )),
        None => None,
    };
    let mut trainer = Trainer::new(pipeline.trainable(), TrainOptions::from_config(cfg, total)?)?;
    // After LoRA is attached, so the checkpointed blocks see which parameters train.
    pipeline
        .trainable()
        .set_gradient_checkpointing(cfg.train.gradient_checkpointing);
    let identity = RunIdentity::new(cfg, model_dir, &trainer, train_path, num_records)?;
    let mut position = SamplerState::default();
    if let Some(dir) = &resume {
        let stored = ResumeState::read(dir)?;
        stored.check_identity(dir, &identity)?;
        trainer.load_checkpoint(dir)?;
        position = stored.position(batches_per_epoch, num_records, dir);
        tracing::info!(
            step = trainer.step,
            epoch = position.epoch,
            "resumed from {}",
            dir.display()
        );
    }
    prepared.clear()?;
    let mut metrics = MetricsLog::resume(&out, trainer.step)?;
    tracing::info!(
        samples = num_records,
        steps = total,
        trainable = trainer.num_trainable(),
        "training"
    );

    let load = BatchLoad::new(records, builder, &cfg.data, device);
    let first = sampler.resume(position)?;
    let later = sampler.clone();
    let next_epoch = position.epoch + 1;
    let jobs = first
        .into_iter()
        .chain((next_epoch..).flat_map(move |e| later.epoch_batches(e)));
    let workers = t.dataloader_workers.max(1);
    let mut loader = Loader::new(
        jobs,
        move |indices: &[usize]| load.load(indices),
        LoaderOptions {
            workers,
            prefetch: (2 * t.grad_accum).max(workers).max(2),
        },
    )?;

    install_interrupt_handler();
    INTERRUPTED.store(false, Ordering::SeqCst);
    let reporter = Reporter::new(total, trainer.step);
    let save = |trainer: &Trainer, pipeline: &mut Box<dyn Pipeline>, position: SamplerState| {
        let extra = serde_json::to_value(ResumeState {
            epoch: position.epoch,
            consumed: position.consumed,
            batches_per_epoch,
            num_samples: num_records,
            identity: Some(identity.clone()),
        })?;
        trainer.save_checkpoint(pipeline.trainable(), &out, extra, t.save_total_limit)
    };
    let mut last_checkpoint = resume.clone();
    let mut empty_steps = 0usize;
    let started = Instant::now();
    while trainer.step < total {
        let want = t.grad_accum.min(batches_per_epoch - position.consumed);
        let micro = next_micro_batches(
            &mut loader,
            &mut position,
            want,
            batches_per_epoch,
            &mut metrics,
        )?;
        if micro.is_empty() {
            empty_steps += 1;
            ensure!(
                empty_steps <= batches_per_epoch,
                "every sample of a whole epoch was left out; nothing to train on"
            );
            continue;
        }
        empty_steps = 0;
        let stopped = || match &last_checkpoint {
            Some(dir) => format!(
                "training stopped; the last good checkpoint is {}",
                dir.display()
            ),
            None => "training stopped before the first checkpoint".to_string(),
        };
        let pending = trainer
            .train_step_deferred(&micro, |b| pipeline.forward_loaded(b, true))
            .with_context(stopped)?;
        let step = pending.step;
        let log_now = step % t.logging_steps == 0 || step == total;
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        let save_now = step % t.save_steps == 0 || (interrupted && step < total);
        // Reading the loss waits for the device, so only logged steps and steps about to be
        // checkpointed are read (which also checks them for NaN before they are saved).
        let stats = if log_now || save_now {
            Some(pending.read().with_context(stopped)?)
        } else {
            None
        };
        if let (true, Some(stats)) = (log_now, &stats) {
            metrics.log(stats)?;
        }
        reporter.step(step, stats.as_ref(), log_now);
        if let (Some(eval), Some(every)) = (&eval, t.eval_steps) {
            if every > 0 && step % every == 0 {
                reporter.info(|| {
                    evaluate_and_log(cfg, pipeline.as_ref(), &trainer, eval, &mut metrics, step)
                })?;
            }
        }
        if save_now {
            let dir = save(&trainer, &mut pipeline, position)?;
            reporter.info(|| tracing::info!(step, "saved {}", dir.display()));
            last_checkpoint = Some(dir);
        }
        if interrupted && step < total {
            reporter.finish();
            drop(loader);
            let checkpoint = last_checkpoint.context("no checkpoint was written")?;
            tracing::warn!(
                step,
                "interrupted; resume with --resume (checkpoint {})",
                checkpoint.display()
            );
            return Ok(Outcome::Interrupted { step, checkpoint });
        }
    }
    reporter.finish();
    drop(loader);
    if let Some(eval) = &eval {
        if t.eval_steps
            .is_none_or(|every| every == 0 || trainer.step % every != 0)
        {
            evaluate_and_log(
                cfg,
                pipeline.as_ref(),
                &trainer,
                eval,
                &mut metrics,
                trainer.step,
            )?;
        }
    }
    write_outputs(cfg, pipeline.as_mut(), &trainer, model_dir, metrics.path())?;
    tracing::info!(
        steps = trainer.step,
        secs = started.elapsed().as_secs_f64(),
        "finished; outputs in {}",
        out.display()
    );
    Ok(Outcome::Finished {
        steps: trainer.step,
        output_dir: out,
    })
}

/// The settings that must be positive.
fn check_settings(t: &TrainSection) -> Result<()> {
    ensure!(t.batch_size > 0, "train.batch_size must be at least 1");
    ensure!(t.grad_accum > 0, "train.grad_accum must be at least 1");
    ensure!(t.save_steps > 0, "train.save_steps must be at least 1");
    ensure!(
        t.logging_steps > 0,
        "train.logging_steps must be at least 1"
    );
    Ok(())
}

/// Opens the model for training: quantised to 4 bits for `qlora` (whose frozen base only
/// adapters can train on), with the configured loss chunking.
fn open_pipeline(
    cfg: &Config,
    family: &dyn DynFamily,
    model_dir: &Path,
    device: Device,
    kind: Kind,
) -> Result<Box<dyn Pipeline>> {
    let t = &cfg.train;
    let open = OpenOptions {
        device,
        kind,
        processor: ProcessorOptions::from_config(&cfg.data),
    };
    let quant = if t.mode == Mode::Qlora {
        ensure!(
            t.component_modes().llm == ComponentMode::Lora,
            "train.mode = \"qlora\" trains LoRA adapters on a frozen 4-bit LLM; \
             train.llm must be \"lora\" (use mode = \"full\" or \"lora\" otherwise)"
        );
        Some(QuantSpec::from_config(&cfg.quant)?)
    } else {
        None
    };
    let mut pipeline = family.open(model_dir, open, quant.as_ref())?;
    pipeline.set_loss_head(LossHead::new(t.loss_chunk_size).context("train.loss_chunk_size")?);
    Ok(pipeline)
}

/// The batch order: shuffled, or grouped by token length (`train.group_by_length`, which
/// measures every sample once and leaves out those that fail under `on_bad_sample`).
fn sampler(
    cfg: &Config,
    records: Vec<Record>,
    pipeline: &dyn Pipeline,
) -> Result<(Vec<Record>, Arc<dyn BatchSampler>)> {
    let t = &cfg.train;
    if !t.group_by_length {
        let sampler = ShuffledSampler::new(records.len(), t.batch_size, t.seed, false)?;
        return Ok((records, Arc::new(sampler)));
    }
    let media = MediaOptions::from_config(&cfg.data);
    let mut lengths = Vec::with_capacity(records.len());
    let mut kept = Vec::with_capacity(records.len());
    for record in records {
        let len = prepare(&record, &media).and_then(|p| pipeline.data().encoded_length(&p));
        match (len, cfg.data.on_bad_sample) {
            (Ok(len), _) => {
                lengths.push(len);
                kept.push(record);
            }
            (Err(e), OnBadSample::Skip) => {
                tracing::warn!("skipping sample at {}: {e:#}", record.location)
            }
            (Err(e), OnBadSample::Error) => {
                return Err(e.context(format!("measuring sample at {}", record.location)))
            }
        }
    }
    let sampler = LengthGroupedSampler::new(lengths, t.batch_size, t.seed, false)?;
    Ok((kept, Arc::new(sampler)))
}

/// Optimiser steps of the run: `train.max_steps`, else `train.epochs` worth.
fn total_steps(t: &TrainSection, batches_per_epoch: usize) -> Result<u64> {
    let steps_per_epoch = batches_per_epoch.div_ceil(t.grad_accum) as u64;
    let total = match t.max_steps {
        Some(n) => n,
        None => (t.epochs * steps_per_epoch as f64).ceil() as u64,
    };
    ensure!(
        total > 0,
        "nothing to train: train.epochs and train.max_steps give 0 steps"
    );
    Ok(total)
}

/// The next `want` batches of the loader for one optimiser step, advancing `position`;
/// batches whose every sample was left out are not among them.
fn next_micro_batches(
    loader: &mut Loader<Option<LoadedBatch>>,
    position: &mut SamplerState,
    want: usize,
    batches_per_epoch: usize,
    metrics: &mut MetricsLog,
) -> Result<Vec<LoadedBatch>> {
    let mut micro = Vec::with_capacity(want);
    for _ in 0..want {
        let batch = loader
            .next()
            .context("the data loader ended early")?
            .with_context(|| format!("epoch {}, batch {}", position.epoch, position.consumed))?;
        position.consumed += 1;
        if position.consumed == batches_per_epoch {
            *position = SamplerState {
                epoch: position.epoch + 1,
                consumed: 0,
            };
        }
        if let Some(batch) = batch {
            metrics.add_tokens(batch.tokens);
            micro.push(batch);
        }
    }
    Ok(micro)
}

/// The final output directory: weights (adapter or full), model files, resolved config, loss
/// plot. `metrics.jsonl` is already there.
fn write_outputs(
    cfg: &Config,
    pipeline: &mut dyn Pipeline,
    trainer: &Trainer,
    model_dir: &Path,
    metrics_path: &Path,
) -> Result<()> {
    let out = &cfg.train.output_dir;
    let copied = copy_model_files(model_dir, out)?;
    let has_lora = trainer
        .params
        .iter()
        .any(|p| p.name.ends_with(".lora_A.weight"));
    match (&trainer.options.lora, has_lora) {
        (Some(spec), true) => save_adapter(
            pipeline.trainable(),
            spec,
            out,
            Some(&model_dir.display().to_string()),
        )?,
        _ => save_hf_weights(pipeline.trainable(), out, cfg.train.max_shard_size as usize)?,
    }
    let text = toml::to_string_pretty(cfg).context("rendering the resolved config")?;
    let path = out.join(CONFIG_FILE);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let rows = metrics::read_rows(metrics_path)?;
    let (train, eval) = plot::series(&rows);
    plot::plot_curves(
        &train,
        &eval,
        &plot::generation_series(&rows),
        &out.join("loss.png"),
    )?;
    outdir::record_outputs(out, &copied)
}
