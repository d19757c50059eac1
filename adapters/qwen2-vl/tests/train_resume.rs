//! Exact resume: a LoRA run (dropout 0.1, so the RNG matters) checkpointing every 2 steps
//! with `save_total_limit = 2` is SIGKILLed in a child process after step 7 (steps 7's
//! progress is lost; checkpoints 4 and 6 remain, 2 was rotated out). Resuming from the
//! latest checkpoint and training to step 10 must give trainable weights bit-identical to an
//! uninterrupted 10-step run, and the data position stored in the checkpoint.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lmms_ft_core::config::Config;
use lmms_ft_core::family::Model;
use lmms_ft_core::testing::max_abs_diff;
use lmms_ft_core::train::{checkpoint, TrainOptions, Trainer};
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use serde_json::json;
use tch::{Device, Kind, Tensor};

const STEPS: u64 = 10;
const CHILD_ENV: &str = "LMMS_FT_TEST_RESUME_CHILD";

/// Trains to `STEPS` (or forever-stalls after `stall_after`), resuming from the latest
/// checkpoint in `out` when `resume`. Returns the trainable tensors by name.
fn run(
    fx: &common::Fixture,
    out: &Path,
    resume: bool,
    stall_after: Option<u64>,
) -> Vec<(String, Tensor)> {
    let mut model = Qwen2VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    let mut c = Config::default();
    c.train.learning_rate = 5e-3;
    c.train.warmup_ratio = 0.2;
    c.lora.r = 4;
    c.lora.dropout = 0.1;
    let mut trainer =
        Trainer::new(&mut model, TrainOptions::from_config(&c, STEPS).unwrap()).unwrap();
    let mut position = 0u64;
    if resume {
        let latest = checkpoint::latest(out)
            .unwrap()
            .expect("a checkpoint to resume from");
        let extra = trainer.load_checkpoint(&latest).unwrap();
        position = extra["data_position"].as_u64().unwrap();
        assert_eq!(
            position, trainer.step,
            "data position follows the step (batch size 1, no accumulation)"
        );
    }
    while trainer.step < STEPS {
        let i = (position % fx.batches.len() as u64) as usize;
        trainer
            .train_step(&[i], |&i| model.forward(&fx.batches[i], true))
            .unwrap();
        position += 1;
        if trainer.step % 2 == 0 {
            trainer
                .save_checkpoint(&mut model, out, json!({"data_position": position}), Some(2))
                .unwrap();
        }
        if Some(trainer.step) == stall_after {
            std::fs::write(out.join("stalled"), b"").unwrap();
            std::thread::sleep(Duration::from_secs(600));
        }
    }
    trainer
        .params
        .iter()
        .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
        .collect()
}

/// The training process the parent kills: this same test, started again by the parent with
/// the output directory in [`CHILD_ENV`]. It stalls after step 7 until killed, so it never
/// passes on its own: returning at all is a failure.
fn train_until_killed(out: PathBuf) -> ! {
    let fx = common::load(PathBuf::from(
        std::env::var_os("LMMS_FT_TEST_FIXTURE").expect("the parent names the fixture"),
    ));
    run(&fx, &out, false, Some(7));
    panic!("the training child was not killed while stalled after step 7");
}

#[test]
fn train_resume_after_sigkill_matches_uninterrupted_run() {
    if let Some(out) = std::env::var_os(CHILD_ENV) {
        train_until_killed(PathBuf::from(out));
    }
    let fx = common::fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (killed, straight) = (tmp.path().join("killed"), tmp.path().join("straight"));
    std::fs::create_dir_all(&killed).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "train_resume_after_sigkill_matches_uninterrupted_run",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, &killed)
        .env("LMMS_FT_TEST_FIXTURE", &fx.dir)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !killed.join("stalled").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the training child exited early: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the training child never reached step 7"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let kept: Vec<u64> = checkpoint::list(&killed)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        kept,
        vec![4, 6],
        "save_total_limit = 2 keeps the two newest checkpoints"
    );

    let resumed = run(fx, &killed, true, None);
    let reference = run(fx, &straight, false, None);
    assert_eq!(resumed.len(), reference.len());
    for ((n1, a), (n2, b)) in resumed.iter().zip(&reference) {
        assert_eq!(n1, n2);
        assert_eq!(max_abs_diff(a, b), 0.0, "{n1} differs after resume");
    }
    // The run actually moved the weights (lora_B starts at zero).
    let b = resumed
        .iter()
        .find(|(n, _)| n.ends_with("lora_B.weight"))
        .unwrap();
    assert!(b.1.abs().max().double_value(&[]) > 0.0);
}
