//! The `lmms-ft` binary as a user meets it: the model table arriving from the adapter crates,
//! alias resolution, error lines, config show, and libtorch loading without LD_LIBRARY_PATH.

use std::process::{Command, Output};

fn lmms_ft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(args)
        // The binary must find libtorch through its rpath alone.
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("RUST_LOG")
        .output()
        .expect("run lmms-ft")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// The binary's adapter crates, linked here too: the table below comes from their
// registrations (each adapter crate's own `tests/registration.rs` pins its ids and Hub ids).
use lmms_ft_adapters as _;
use lmms_ft_core::registry;

/// The adapter crates the binary depends on, from `Cargo.toml` (every `lmms-ft-*`
/// dependency but the core), as Rust crate names.
fn adapter_crates() -> Vec<String> {
    let manifest: toml::Value = toml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap(),
    )
    .unwrap();
    let mut crates: Vec<String> = manifest["dependencies"]
        .as_table()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("lmms-ft-") && *k != "lmms-ft-core")
        .map(|k| k.replace('-', "_"))
        .collect();
    crates.sort();
    crates
}

#[test]
fn list_models_json_has_every_id_from_its_adapter_crate() {
    let out = lmms_ft(&["list-models", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let expected = registry::model_table();
    assert!(!expected.is_empty(), "the adapters register models");
    assert_eq!(rows.len(), expected.len(), "exactly the registered models");
    // Every adapter the binary depends on announces models, and only adapters do: the core
    // registers nothing (its own test proves it).
    let mut registering: Vec<String> = expected
        .iter()
        .map(|m| m.registered_by.to_string())
        .collect();
    registering.sort();
    registering.dedup();
    assert_eq!(registering, adapter_crates());
    for (row, model) in rows.iter().zip(&expected) {
        // The binary prints the registry's rows in its order, every field.
        assert_eq!(row, &serde_json::to_value(model).unwrap(), "{}", model.id);
        // The table says truthfully which families are implemented.
        let family = registry::family(model.family).unwrap();
        assert_eq!(
            row["status"],
            if family.implementation.is_some() {
                "implemented"
            } else {
                "planned"
            },
            "{}",
            model.id
        );
    }
}

#[test]
fn list_models_table_is_human_readable() {
    let out = lmms_ft(&["list-models"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().next().unwrap().starts_with("id"));
    let models = registry::model_table();
    assert_eq!(text.lines().count(), models.len() + 1);
    for (line, model) in text.lines().skip(1).zip(&models) {
        assert!(line.starts_with(model.id), "{line}");
        assert!(
            line.contains(model.hub_id) && line.contains(model.family),
            "{line}"
        );
        assert!(line.ends_with(&model.aliases.join(", ")), "{line}");
    }
}

fn assert_clean_error(o: &Output) -> String {
    assert!(!o.status.success());
    let err = stderr(o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("error:") || l.starts_with("hint:"))
        .collect();
    assert!(lines.len() >= 2, "error and hint lines: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    err
}

#[test]
fn aliases_resolve_to_the_cache_or_report_unimplemented_families() {
    // An implemented family's alias resolves to its Hub repo and then looks in the cache.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(["evaluate", "--model", "qwen2-vl-7b", "--data", "x.json"])
        .env("HF_HOME", empty.path())
        .output()
        .unwrap();
    let err = assert_clean_error(&out);
    assert!(
        err.contains("Qwen/Qwen2-VL-7B-Instruct") && err.contains("--model-path"),
        "{err}"
    );
    // Hub ids resolve too, case-insensitively (every family is implemented now; a planned
    // one's refusal is the registry's own test).
    let out = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args([
            "evaluate",
            "--model",
            "microsoft/phi-3.5-vision-INSTRUCT",
            "--data",
            "x.json",
        ])
        .env("HF_HOME", empty.path())
        .output()
        .unwrap();
    let err = assert_clean_error(&out);
    assert!(
        err.contains("microsoft/Phi-3.5-vision-instruct") && err.contains("--model-path"),
        "{err}"
    );
}

#[test]
fn unknown_model_and_bad_config_are_one_line_errors() {
    let err = assert_clean_error(&lmms_ft(&["train", "--model", "gpt-99"]));
    assert!(err.contains("unknown model id 'gpt-99'"), "{err}");
    let err = assert_clean_error(&lmms_ft(&["config", "show", "--set", "train.lr=1"]));
    assert!(
        err.contains("unknown config key `train.lr`") && err.contains("command line"),
        "{err}"
    );
    let err = assert_clean_error(&lmms_ft(&["config", "show", "--config", "/no/such.toml"]));
    assert!(err.contains("/no/such.toml"), "{err}");
}

#[test]
fn config_show_prints_resolved_layers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.toml");
    std::fs::write(&file, "[train]\nbatch_size = 3\nlearning_rate = 0.5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args([
            "config",
            "show",
            "--config",
            file.to_str().unwrap(),
            "--set",
            "train.learning_rate=0.25",
            "--model",
            "phi3-v",
        ])
        .env("LMMS_FT_TRAIN__SEED", "7")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg: toml::Value = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(cfg["train"]["batch_size"].as_integer(), Some(3));
    assert_eq!(cfg["train"]["learning_rate"].as_float(), Some(0.25));
    assert_eq!(cfg["train"]["seed"].as_integer(), Some(7));
    assert_eq!(cfg["model"]["id"].as_str(), Some("phi3-v"));
}

#[test]
fn every_family_has_an_example_config_naming_one_of_its_models() {
    let out = lmms_ft(&["list-models", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!rows.is_empty());
    let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut families: Vec<&str> = rows.iter().map(|r| r["family"].as_str().unwrap()).collect();
    families.dedup();
    for family in families {
        let file = configs.join(format!("{family}.toml"));
        let cfg: toml::Value = toml::from_str(
            &std::fs::read_to_string(&file)
                .unwrap_or_else(|_| panic!("{} missing", file.display())),
        )
        .unwrap();
        let id = cfg["model"]["id"].as_str().unwrap();
        let row = rows
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {family}.toml is not registered"));
        assert_eq!(row["family"], family);
    }
}

#[test]
fn doctor_runs_libtorch_without_ld_library_path() {
    let out = lmms_ft(&["doctor", "--device", "cpu"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["autograd_check_error"].as_f64().unwrap() < 1e-4);
    assert_eq!(report["device"], "Cpu");
}
