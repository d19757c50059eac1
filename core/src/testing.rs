//! Helpers for tests that compare against the Python oracle (pinned `transformers`, `peft`,
//! PIL) — shared so every suite finds the interpreter and the real Hub configs the same way.
//! A missing oracle is a failure with instructions, never a silent skip.

pub mod generation;
pub mod train_parity;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The oracle interpreter: `$LMMS_FT_PYTHON`, else the venv `scripts/setup.sh` creates.
pub fn oracle_python() -> PathBuf {
    if let Some(p) = std::env::var_os("LMMS_FT_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("LMMS_FT_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lmms-ft")))
        .unwrap_or_default();
    let venv = std::env::var_os("LMMS_FT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join("venv"));
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "no Python oracle: set LMMS_FT_PYTHON or run scripts/setup.sh to create {}",
        python.display()
    );
    python
}

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("core/ has a parent")
        .to_path_buf()
}

/// `tests/data/hub`: the real Hub configuration files the tests read, copied into the
/// repository (with their provenance) so a bare clone passes the suite.
pub fn hf_configs() -> PathBuf {
    let dir = repo_root().join("tests/data/hub");
    assert!(
        dir.is_dir(),
        "{} is missing from the checkout",
        dir.display()
    );
    dir
}

/// Runs `scripts/oracle/<script>` with `args`; panics with its stderr if it fails, returns
/// its stdout.
pub fn run_oracle(script: &str, args: &[&str]) -> String {
    let path = repo_root().join("scripts/oracle").join(script);
    let out = Command::new(oracle_python())
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The fixture `scripts/oracle/<script> OUT VARIANT HF_CONFIGS` writes (a tiny checkpoint
/// and reference outputs), and what the script printed. Each (script version, variant) is
/// made once and then reused by every test binary and run, from a cache under the system temp
/// dir: fixtures take seconds to make and some hundred MB each, and tests only read them.
/// The scripts seed everything, so a cached fixture is the one the script would write now.
/// Concurrent makers (parallel test binaries) each write a private directory and rename it
/// into place; the first rename wins and the others use it.
pub fn cached_fixture(script: &str, variant: &str) -> (PathBuf, String) {
    use std::hash::{Hash, Hasher};
    let path = repo_root().join("scripts/oracle").join(script);
    let source = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (source, variant, oracle_python()).hash(&mut hasher);
    let stem = format!("{}-{variant}-", script.trim_end_matches(".py"));
    let root = std::env::temp_dir().join("lmms-ft-fixtures");
    let dir = root.join(format!("{stem}{:016x}", hasher.finish()));
    let printed = dir.join("oracle-stdout.txt");
    if let Ok(text) = std::fs::read_to_string(&printed) {
        return (dir, text);
    }
    std::fs::create_dir_all(&root).expect("creating the fixture cache");
    // Versions made by older scripts are not used again; a day's grace keeps the ones that
    // other checkouts (branches with other script versions) may be reading right now.
    let day = std::time::Duration::from_secs(24 * 3600);
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > day));
        if name.starts_with(&stem) && entry.path() != dir && stale {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let scratch = root.join(format!(".making-{}-{nanos}", std::process::id()));
    let out = scratch.join("fixture");
    let text = run_oracle(
        script,
        &[
            out.to_str().unwrap(),
            variant,
            hf_configs().to_str().unwrap(),
        ],
    );
    std::fs::write(out.join("oracle-stdout.txt"), &text).expect("writing the oracle output");
    let moved = std::fs::rename(&out, &dir);
    let _ = std::fs::remove_dir_all(&scratch);
    if moved.is_err() && !printed.is_file() {
        panic!("cannot move the fixture into {}", dir.display());
    }
    (dir, text)
}

/// Checks an `lmms-ft evaluate --json` report of the fixture's `samples` (in that order)
/// against the oracle's `reference.json` / `reference.safetensors` in `fixture`: each loss
/// under the label rule (≤ 1e-5 relative), each label count after the causal shift (counted
/// from the oracle's labels), and the token-weighted mean. `what` names the case in failures.
pub fn assert_evaluate_report(fixture: &Path, report: &Path, samples: &[&str], what: &str) {
    let read_json = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let meta = read_json(&fixture.join("reference.json"));
    let report = read_json(report);
    let reference: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(fixture.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let (mut weighted, mut tokens) = (0.0, 0i64);
    for (i, name) in samples.iter().enumerate() {
        let row = &report["samples"][i];
        assert_eq!(row["index"], i, "{what}/{name}");
        let expected = meta["samples"][name]["rule_loss"].as_f64().unwrap();
        let loss = row["loss"].as_f64().unwrap();
        assert!(
            ((loss - expected) / expected).abs() <= 1e-5,
            "{what}/{name}: {loss} vs {expected}"
        );
        let labels: Vec<i64> =
            Vec::try_from(reference[&format!("{name}.rule_labels")].flatten(0, -1)).unwrap();
        let n = labels.iter().skip(1).filter(|&&l| l != -100).count() as i64;
        assert_eq!(row["num_label_tokens"], n, "{what}/{name}");
        eprintln!("{what}/{name}: loss {loss:.6} vs {expected:.6}, {n} label tokens");
        weighted += expected * n as f64;
        tokens += n;
    }
    let mean = report["mean_loss"].as_f64().unwrap();
    assert!(
        (mean - weighted / tokens as f64).abs() <= 1e-5 * mean,
        "{what}: mean {mean}"
    );
}

/// Maximum absolute difference of two tensors (as f64), after checking shapes agree.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Chat messages as the oracle scripts write them (`{"role", "content": [{"type": "text" |
/// "image" | "video", ...}]}`) turned into a conversation, media numbered in order.
pub fn conversation_from_messages(messages: &serde_json::Value) -> crate::data::Conversation {
    use crate::data::{Conversation, Part, Role, Turn};
    let (mut images, mut videos) = (0, 0);
    let turns = messages
        .as_array()
        .expect("messages is a list")
        .iter()
        .map(|m| {
            let role = match m["role"].as_str() {
                Some("system") => Role::System,
                Some("user") => Role::User,
                _ => Role::Assistant,
            };
            let parts = m["content"]
                .as_array()
                .expect("content is a list")
                .iter()
                .map(|p| match p["type"].as_str() {
                    Some("image") => {
                        images += 1;
                        Part::Image { index: images - 1 }
                    }
                    Some("video") => {
                        videos += 1;
                        Part::Video { index: videos - 1 }
                    }
                    _ => Part::Text {
                        text: p["text"].as_str().unwrap_or_default().to_string(),
                    },
                })
                .collect();
            Turn { role, parts }
        })
        .collect();
    Conversation { turns }
}

/// Writes `frames` frames of `size` at `fps` with FFmpeg's MPEG-4 Part 2 encoder (B-frames
/// on, so a decoder must reorder) into the container `path`'s extension names; frame `i` is
/// painted `colour(i)`. Without `durations` the packets carry none, as from careless muxers.
pub fn write_test_video(
    path: &Path,
    frames: usize,
    size: (u32, u32),
    fps: i32,
    durations: bool,
    colour: &dyn Fn(usize) -> [u8; 3],
) {
    use ffmpeg::format::Pixel;
    use ffmpeg::software::scaling::{context::Context as Scaler, flag::Flags};
    use ffmpeg_next as ffmpeg;
    let (w, h) = size;
    ffmpeg::init().unwrap();
    let mut octx = ffmpeg::format::output(path).unwrap();
    let codec = ffmpeg::encoder::find(ffmpeg::codec::Id::MPEG4).expect("no MPEG-4 encoder");
    let global = octx
        .format()
        .flags()
        .contains(ffmpeg::format::Flags::GLOBAL_HEADER);
    let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .unwrap();
    let tb = ffmpeg::Rational(1, fps);
    enc.set_width(w);
    enc.set_height(h);
    enc.set_format(Pixel::YUV420P);
    enc.set_time_base(tb);
    enc.set_frame_rate(Some(ffmpeg::Rational(fps, 1)));
    enc.set_bit_rate(2_000_000);
    enc.set_gop(8);
    enc.set_max_b_frames(2);
    if global {
        enc.set_flags(ffmpeg::codec::Flags::GLOBAL_HEADER);
    }
    let mut enc = enc.open_as(codec).unwrap();
    {
        let mut ost = octx.add_stream(codec).unwrap();
        ost.set_parameters(&enc);
        ost.set_time_base(tb);
    }
    octx.write_header().unwrap();
    let ost_tb = octx.stream(0).unwrap().time_base();
    let mut scaler =
        Scaler::get(Pixel::RGB24, w, h, Pixel::YUV420P, w, h, Flags::BILINEAR).unwrap();
    let write_packets = |enc: &mut ffmpeg::encoder::Video,
                         octx: &mut ffmpeg::format::context::Output| {
        let mut packet = ffmpeg::Packet::empty();
        while enc.receive_packet(&mut packet).is_ok() {
            packet.set_stream(0);
            if durations {
                packet.set_duration(1);
            }
            packet.rescale_ts(tb, ost_tb);
            packet.write_interleaved(octx).unwrap();
        }
    };
    for i in 0..frames {
        let mut rgb = ffmpeg::frame::Video::new(Pixel::RGB24, w, h);
        let stride = rgb.stride(0);
        let data = rgb.data_mut(0);
        for y in 0..h as usize {
            for x in 0..w as usize {
                data[y * stride + 3 * x..y * stride + 3 * x + 3].copy_from_slice(&colour(i));
            }
        }
        let mut yuv = ffmpeg::frame::Video::empty();
        scaler.run(&rgb, &mut yuv).unwrap();
        yuv.set_pts(Some(i as i64));
        enc.send_frame(&yuv).unwrap();
        write_packets(&mut enc, &mut octx);
    }
    enc.send_eof().unwrap();
    write_packets(&mut enc, &mut octx);
    octx.write_trailer().unwrap();
}

/// Asserts that `got` gradients equal `want` within `tol`, each parameter's error and the
/// whole error measured against the norm of the whole `want` gradient (some gradients, such
/// as a key bias's, are zero up to rounding, so per-tensor relative errors mean nothing).
/// Returns the whole relative error and how many tensors were compared.
fn assert_grads_close(
    vars: &[(String, tch::Tensor)],
    got: &[Option<tch::Tensor>],
    want: &[Option<tch::Tensor>],
    tol: f64,
    what: &str,
) -> (f64, usize) {
    let norm = |t: &tch::Tensor| t.norm().double_value(&[]);
    let scale = want
        .iter()
        .flatten()
        .map(|w| norm(w).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(scale > 0.0, "{what}: no gradient reached any parameter");
    let (mut compared, mut total) = (0, 0.0);
    for ((name, _), (g, w)) in vars.iter().zip(got.iter().zip(want)) {
        match (g, w) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                let err = norm(&(g - w));
                assert!(
                    err <= tol * scale,
                    "{what}: gradient of {name} differs by {err:.3e} (gradient norm {scale:.3e})"
                );
                total += err * err;
                compared += 1;
            }
            _ => panic!("{what}: {name} has a gradient on one side only"),
        }
    }
    let rel = total.sqrt() / scale;
    assert!(rel <= tol, "{what}: gradients differ by {rel:.3e} relative");
    (rel, compared)
}

/// Loss and gradient of every variable that requires grad, after one backward of `loss`.
fn loss_and_grads(
    vars: &[(String, tch::Tensor)],
    loss: tch::Tensor,
) -> (f64, Vec<Option<tch::Tensor>>) {
    for (_, v) in vars {
        let _ = crate::autograd::take_grad(v);
    }
    loss.backward();
    let grads = vars
        .iter()
        .map(|(_, v)| crate::autograd::take_grad(v))
        .collect();
    (loss.double_value(&[]), grads)
}

/// Checks the core's loss head on a family's model: for chunks of 3 positions (several
/// chunks, the last one short) and one chunk for everything, the summed loss of [`crate::loss::LossHead`] equals the cross-entropy of
/// the full shifted logits `[batch, seq, vocab]` (`labels` is the batch's `[batch, seq]`
/// label tensor), and so does the gradient of every parameter. Both head paths are
/// exercised: every parameter trainable (the head's gradient through ordinary autograd), and
/// the head's weight (`lm_head`, or the embeddings of a tied model) frozen with the rest
/// trainable (the gradient taken per chunk in forward). Leaves every parameter trainable.
///
/// Tolerances, relative: with an fp64 model, loss and every parameter's gradient ≤ 1e-10
/// (gradients measured against the norm of the whole gradient, since some, such as a key
/// bias's, are zero up to rounding; ~1e-16 is typical). With an fp32 model the loss ≤ 1e-6
/// and the gradients ≤ 2e-5: both sides then reduce over the whole vocabulary in fp32
/// (`Σ_v (p_v − y_v) W_v`, 150k terms that cancel) with differently shaped matrix products,
/// which alone moves them by ~5e-6.
pub fn assert_loss_head_matches_full_logits<M: crate::family::Model>(
    model: &M,
    batch: &M::Batch,
    labels: &tch::Tensor,
    what: &str,
) {
    use crate::loss::LossHead;
    let mut vars: Vec<(String, tch::Tensor)> = crate::family::Trainable::var_store(model)
        .variables()
        .into_iter()
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let fp64 = vars.iter().all(|(_, v)| v.kind() == tch::Kind::Double);
    let (loss_tol, grad_tol) = if fp64 { (1e-10, 1e-10) } else { (1e-6, 2e-5) };
    let what = format!("{what} ({})", if fp64 { "fp64" } else { "fp32" });
    let targets = model.loss_targets(batch).expect("the batch has labels");
    assert!(targets.count > 0, "{what}: the batch has no label tokens");
    // The head's weight: `lm_head`, or the embeddings a tied model reuses.
    let untied = vars.iter().any(|(n, _)| n.ends_with("lm_head.weight"));
    let head_weight = if untied {
        "lm_head.weight"
    } else {
        "embed_tokens.weight"
    };
    for frozen_head in [false, true] {
        for (name, v) in &vars {
            let _ = v.set_requires_grad(!(frozen_head && name.ends_with(head_weight)));
        }
        let logits = model.lm_head(&model.hidden_states(batch, true).unwrap());
        let full = crate::nn::shifted_token_loss_sum(&logits, labels, crate::family::IGNORE_INDEX);
        drop(logits);
        let (want, want_grads) = loss_and_grads(&vars, full);
        for chunk in [3, usize::MAX] {
            let case = format!("{what} (chunk {chunk}, frozen head: {frozen_head})");
            let out = LossHead::new(chunk)
                .unwrap()
                .forward(model, batch, true)
                .unwrap();
            assert_eq!(out.num_label_tokens, targets.count, "{case}");
            let (got, got_grads) = loss_and_grads(&vars, out.loss_sum.expect("a loss"));
            assert!(
                (got - want).abs() <= loss_tol * want.abs(),
                "{case}: loss {got} vs full logits {want}"
            );
            let (rel, _) = assert_grads_close(&vars, &got_grads, &want_grads, grad_tol, &case);
            eprintln!("{case}: loss {got:.6} vs {want:.6}, gradients within {rel:.2e}");
        }
    }
    for (_, v) in &vars {
        let _ = v.set_requires_grad(true);
    }
}

/// [`assert_packing_matches_padding`] twice: all `samples` in one row, and rows as long as the
/// first two samples together (at least the longest sample), so packing is checked both with
/// every sample sharing a row and with samples split across rows.
pub fn assert_packing_matches_padding_in_rows(
    pipeline: &dyn crate::family::Pipeline,
    samples: &[crate::family::PreparedConversation],
    variant: &str,
) {
    let lengths: Vec<usize> = samples
        .iter()
        .map(|s| pipeline.data().encoded_length(s).unwrap())
        .collect();
    let all: usize = lengths.iter().sum();
    let pair = (lengths[0] + lengths[1]).max(*lengths.iter().max().unwrap());
    assert_packing_matches_padding(pipeline, samples, all, &format!("{variant}, one row"));
    assert_packing_matches_padding(
        pipeline,
        samples,
        pair,
        &format!("{variant}, rows of {pair}"),
    );
}

/// Checks `data.packing` through a pipeline's own batch building: `samples` packed into rows
/// of at most `max_length` tokens ([`crate::family::BatchBuilder::collate_packed`]) give the
/// loss, the label count and every parameter's gradient of the same samples padded into a
/// batch (fp32, ≤ 1e-5 relative; gradients against the norm of the whole gradient). `max_length` must make some row hold several samples, so
/// the check cannot pass by packing nothing. Leaves every parameter trainable.
pub fn assert_packing_matches_padding(
    pipeline: &dyn crate::family::Pipeline,
    samples: &[crate::family::PreparedConversation],
    max_length: usize,
    what: &str,
) {
    let builder = pipeline.batch_builder();
    let encode = || -> Vec<crate::family::EncodedSample> {
        samples
            .iter()
            .map(|s| builder.encode(s, false).unwrap())
            .collect()
    };
    let lengths: Vec<usize> = encode().iter().map(|s| s.len()).collect();
    let plan = crate::data::batch::plan_packing(
        &lengths,
        max_length,
        crate::data::batch::PackStrategy::Greedy,
    )
    .unwrap();
    assert!(
        plan.iter().any(|row| row.len() > 1),
        "{what}: max_length {max_length} packs no two of the samples ({lengths:?}) together"
    );
    let padded = builder.collate(encode(), tch::Device::Cpu).unwrap();
    let packed = builder
        .collate_packed(encode(), max_length, tch::Device::Cpu)
        .unwrap();
    let mut vars: Vec<(String, tch::Tensor)> =
        pipeline.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in &vars {
        let _ = v.set_requires_grad(true);
    }
    let run = |batch: &crate::family::LoadedBatch| {
        let out = pipeline.forward_loaded(batch, true).unwrap();
        let n = out.num_label_tokens;
        let (loss, grads) = loss_and_grads(&vars, out.loss_sum.expect("a loss"));
        (loss, n, grads)
    };
    let (want, want_n, want_grads) = run(&padded);
    let (got, got_n, got_grads) = run(&packed);
    assert!(want_n > 0, "{what}: no label tokens");
    assert_eq!(got_n, want_n, "{what}: label tokens packed vs padded");
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "{what}: packed loss {got} vs padded {want}"
    );
    let (rel, compared) = assert_grads_close(
        &vars,
        &got_grads,
        &want_grads,
        1e-5,
        &format!("{what} (packed)"),
    );
    eprintln!(
        "{what}: {} samples in {} packed rows: loss {got:.6} vs padded {want:.6}, {compared} gradients within {rel:.2e}",
        samples.len(),
        plan.len()
    );
}

/// Asserts that the models registered by the crate `krate` (its `module_path!()` at the
/// registration) are exactly `expected`, as (id, Hub id, family), and that each names a
/// registered family: an adapter crate's own check of what it announces, so the binary's tests
/// can take the table from the registry instead of copying it.
pub fn assert_registers_models(krate: &str, expected: &[(&str, &str, &str)]) {
    let rows: Vec<_> = crate::registry::model_table()
        .into_iter()
        .filter(|r| r.registered_by == krate)
        .collect();
    let ids: Vec<&str> = rows.iter().map(|r| r.id).collect();
    assert_eq!(
        rows.len(),
        expected.len(),
        "{krate} registers exactly the expected models; got {ids:?}"
    );
    for (id, hub, family) in expected {
        let row = rows
            .iter()
            .find(|r| r.id == *id)
            .unwrap_or_else(|| panic!("{id} is not registered by {krate} (got {ids:?})"));
        assert_eq!(row.hub_id, *hub, "{id}");
        assert_eq!(row.family, *family, "{id}");
        let entry = crate::registry::family(family)
            .unwrap_or_else(|| panic!("{id}: family {family} is not registered"));
        assert_eq!(entry.registered_by, krate, "family {family}");
    }
}
