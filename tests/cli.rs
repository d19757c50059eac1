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

/// (id, hub id, family, registering crate) for every model the project must list.
const EXPECTED: &[(&str, &str, &str, &str)] = &[
    (
        "llava-1.5-7b",
        "llava-hf/llava-1.5-7b-hf",
        "llava",
        "lmms_ft_llava",
    ),
    (
        "llava-1.5-13b",
        "llava-hf/llava-1.5-13b-hf",
        "llava",
        "lmms_ft_llava",
    ),
    (
        "llava-1.6-vicuna-7b",
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-next",
        "lmms_ft_llava",
    ),
    (
        "llava-1.6-vicuna-13b",
        "llava-hf/llava-v1.6-vicuna-13b-hf",
        "llava-next",
        "lmms_ft_llava",
    ),
    (
        "llava-1.6-mistral-7b",
        "llava-hf/llava-v1.6-mistral-7b-hf",
        "llava-next",
        "lmms_ft_llava",
    ),
    (
        "llava-next-video-7b",
        "llava-hf/LLaVA-NeXT-Video-7B-hf",
        "llava-next-video",
        "lmms_ft_llava",
    ),
    (
        "llava-next-video-7b-32k",
        "llava-hf/LLaVA-NeXT-Video-7B-32K-hf",
        "llava-next-video",
        "lmms_ft_llava",
    ),
    (
        "llava-next-video-34b",
        "llava-hf/LLaVA-NeXT-Video-34B-hf",
        "llava-next-video",
        "lmms_ft_llava",
    ),
    (
        "llava-interleave-qwen-0.5b",
        "llava-hf/llava-interleave-qwen-0.5b-hf",
        "llava",
        "lmms_ft_llava",
    ),
    (
        "llava-interleave-qwen-7b",
        "llava-hf/llava-interleave-qwen-7b-hf",
        "llava",
        "lmms_ft_llava",
    ),
    (
        "llava-onevision-0.5b-ov",
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        "llava-onevision",
        "lmms_ft_llava",
    ),
    (
        "llava-onevision-7b-ov",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "llava-onevision",
        "lmms_ft_llava",
    ),
    (
        "llava-onevision-72b-ov",
        "llava-hf/llava-onevision-qwen2-72b-ov-hf",
        "llava-onevision",
        "lmms_ft_llava",
    ),
    (
        "qwen2-vl-2b-instruct",
        "Qwen/Qwen2-VL-2B-Instruct",
        "qwen2-vl",
        "lmms_ft_qwen2_vl",
    ),
    (
        "qwen2-vl-7b-instruct",
        "Qwen/Qwen2-VL-7B-Instruct",
        "qwen2-vl",
        "lmms_ft_qwen2_vl",
    ),
    (
        "qwen2-vl-72b-instruct",
        "Qwen/Qwen2-VL-72B-Instruct",
        "qwen2-vl",
        "lmms_ft_qwen2_vl",
    ),
    (
        "qwen2.5-vl-3b-instruct",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "qwen2.5-vl",
        "lmms_ft_qwen2_vl",
    ),
    (
        "qwen2.5-vl-7b-instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "qwen2.5-vl",
        "lmms_ft_qwen2_vl",
    ),
    (
        "qwen2.5-vl-72b-instruct",
        "Qwen/Qwen2.5-VL-72B-Instruct",
        "qwen2.5-vl",
        "lmms_ft_qwen2_vl",
    ),
    (
        "qwen3-vl-2b-instruct",
        "Qwen/Qwen3-VL-2B-Instruct",
        "qwen3-vl",
        "lmms_ft_qwen3_vl",
    ),
    (
        "qwen3-vl-2b-thinking",
        "Qwen/Qwen3-VL-2B-Thinking",
        "qwen3-vl",
        "lmms_ft_qwen3_vl",
    ),
    (
        "qwen3-vl-4b-instruct",
        "Qwen/Qwen3-VL-4B-Instruct",
        "qwen3-vl",
        "lmms_ft_qwen3_vl",
    ),
    (
        "qwen3-vl-4b-thinking",
        "Qwen/Qwen3-VL-4B-Thinking",
        "qwen3-vl",
        "lmms_ft_qwen3_vl",
    ),
    (
        "qwen3-vl-8b-instruct",
        "Qwen/Qwen3-VL-8B-Instruct",
        "qwen3-vl",
        "lmms_ft_qwen3_vl",
    ),
    (
        "qwen3-vl-8b-thinking",
        "Qwen/Qwen3-VL-8B-Thinking",
        "qwen3-vl",
        "lmms_ft_qwen3_vl",
    ),
    (
        "qwen3-vl-32b-instruct",
        "Qwen/Qwen3-VL-32B-Instruct",
        "qwen3-vl",
        "lmms_ft_qwen3_vl",
    ),
    (
        "qwen3-vl-32b-thinking",
        "Qwen/Qwen3-VL-32B-Thinking",
        "qwen3-vl",
        "lmms_ft_qwen3_vl",
    ),
    (
        "phi3-v",
        "microsoft/Phi-3-vision-128k-instruct",
        "phi3-v",
        "lmms_ft_phi3_v",
    ),
    (
        "phi3.5-v",
        "microsoft/Phi-3.5-vision-instruct",
        "phi3-v",
        "lmms_ft_phi3_v",
    ),
    (
        "llama-3.2-11b-vision-instruct",
        "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "llama-3.2-vision",
        "lmms_ft_mllama",
    ),
    (
        "llama-3.2-90b-vision-instruct",
        "meta-llama/Llama-3.2-90B-Vision-Instruct",
        "llama-3.2-vision",
        "lmms_ft_mllama",
    ),
];

#[test]
fn list_models_json_has_every_id_from_its_adapter_crate() {
    let out = lmms_ft(&["list-models", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), EXPECTED.len(), "exactly the listed models");
    for (id, hub, family, krate) in EXPECTED {
        let row = rows
            .iter()
            .find(|r| r["id"] == *id)
            .unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(row["hub_id"], *hub, "{id}");
        assert_eq!(row["family"], *family, "{id}");
        // Provenance: the entry was submitted through inventory by the adapter crate,
        // not written into the core (core's own test proves it registers nothing).
        assert_eq!(row["registered_by"], *krate, "{id}");
        // The table says truthfully which families are implemented.
        let implemented = matches!(
            *family,
            "qwen2-vl"
                | "qwen2.5-vl"
                | "qwen3-vl"
                | "llava"
                | "llava-next"
                | "llava-next-video"
                | "llava-onevision"
                | "llama-3.2-vision"
        );
        assert_eq!(
            row["status"],
            if implemented {
                "implemented"
            } else {
                "planned"
            },
            "{id}"
        );
    }
}

#[test]
fn list_models_table_is_human_readable() {
    let out = lmms_ft(&["list-models"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().next().unwrap().starts_with("id"));
    assert_eq!(text.lines().count(), EXPECTED.len() + 1);
    assert!(text.contains("qwen2-vl-7b-instruct") && text.contains("qwen2-vl-7b"));
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
    // A planned family says so; Hub ids resolve too, case-insensitively.
    let err = assert_clean_error(&lmms_ft(&[
        "evaluate",
        "--model",
        "microsoft/phi-3.5-vision-INSTRUCT",
    ]));
    assert!(
        err.contains("phi3.5-v") && err.contains("not implemented"),
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
