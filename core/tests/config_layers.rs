//! Configuration layering and error messages, with a jailed environment and temp files.
// figment::Jail closures must return figment::Result, whose error type is large by design.
#![allow(clippy::result_large_err)]

use figment::Jail;
use lmms_ft_core::config::{ConfigError, Mode, Sources};

fn sources(file: Option<&str>, sets: &[&str]) -> Sources {
    Sources {
        file: file.map(Into::into),
        env: true,
        flags: vec![],
        sets: sets.iter().map(|s| s.to_string()).collect(),
    }
}

fn err_text(e: ConfigError) -> String {
    e.to_string()
}

#[test]
fn four_layers_in_order() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "run.toml",
            r#"
            [train]
            batch_size = 2         # file only
            learning_rate = 3e-4   # file, then env
            grad_accum = 4         # file, env, then --set
            mode = "full"
            "#,
        )?;
        jail.set_env("LMMS_FT_TRAIN__LEARNING_RATE", "5e-5");
        jail.set_env("LMMS_FT_TRAIN__GRAD_ACCUM", "8");
        // Tool variables without a section separator must not be read as config keys.
        jail.set_env("LMMS_FT_HOME", "/somewhere");
        let mut src = sources(Some("run.toml"), &["train.grad_accum=16"]);
        src.flags.push((
            "model.id".into(),
            figment::value::Value::from("qwen2-vl-2b".to_string()),
        ));
        let cfg = src.load().map_err(|e| e.to_string())?;
        assert_eq!(cfg.train.seed, 42, "default survives");
        assert_eq!(cfg.train.batch_size, 2, "file beats default");
        assert_eq!(cfg.train.learning_rate, 5e-5, "env beats file");
        assert_eq!(cfg.train.grad_accum, 16, "--set beats env");
        assert_eq!(cfg.train.mode, Mode::Full);
        assert_eq!(cfg.model.id.as_deref(), Some("qwen2-vl-2b"), "flag applied");
        Ok(())
    });
}

#[test]
fn set_beats_dedicated_flag_and_env() {
    Jail::expect_with(|jail| {
        jail.set_env("LMMS_FT_MODEL__ID", "from-env");
        let mut src = sources(None, &["model.id=from-set"]);
        src.flags.push((
            "model.id".into(),
            figment::value::Value::from("from-flag".to_string()),
        ));
        assert_eq!(src.load().unwrap().model.id.as_deref(), Some("from-set"));
        src.sets.clear();
        assert_eq!(src.load().unwrap().model.id.as_deref(), Some("from-flag"));
        src.flags.clear();
        assert_eq!(src.load().unwrap().model.id.as_deref(), Some("from-env"));
        Ok(())
    });
}

#[test]
fn unknown_key_in_file_names_key_and_file() {
    Jail::expect_with(|jail| {
        jail.create_file("bad.toml", "[train]\nlearnin_rate = 1e-4\n")?;
        let msg = err_text(sources(Some("bad.toml"), &[]).load().unwrap_err());
        assert!(
            msg.contains("unknown config key `train.learnin_rate`"),
            "{msg}"
        );
        assert!(
            msg.contains("TOML file") && msg.contains("bad.toml"),
            "{msg}"
        );
        assert!(msg.contains("learning_rate"), "lists the valid keys: {msg}");
        Ok(())
    });
}

#[test]
fn unknown_section_in_file() {
    Jail::expect_with(|jail| {
        jail.create_file("bad.toml", "[trian]\nseed = 1\n")?;
        let msg = err_text(sources(Some("bad.toml"), &[]).load().unwrap_err());
        assert!(msg.contains("unknown config key `trian`"), "{msg}");
        assert!(msg.contains("bad.toml"), "{msg}");
        Ok(())
    });
}

#[test]
fn unknown_key_from_env_names_variable() {
    Jail::expect_with(|jail| {
        jail.set_env("LMMS_FT_DATA__MAX_LEN", "10");
        let msg = err_text(sources(None, &[]).load().unwrap_err());
        assert!(msg.contains("`data.max_len`"), "{msg}");
        assert!(msg.contains("environment"), "{msg}");
        assert!(msg.contains("LMMS_FT_DATA__MAX_LEN"), "{msg}");
        Ok(())
    });
}

#[test]
fn unknown_key_from_command_line() {
    Jail::expect_with(|_jail| {
        let msg = err_text(sources(None, &["lora.rank=4"]).load().unwrap_err());
        assert!(
            msg.contains("`lora.rank`") && msg.contains("command line"),
            "{msg}"
        );
        Ok(())
    });
}

#[test]
fn type_error_names_file_and_key() {
    Jail::expect_with(|jail| {
        jail.create_file("typo.toml", "[train]\nbatch_size = \"two\"\n")?;
        let msg = err_text(sources(Some("typo.toml"), &[]).load().unwrap_err());
        assert!(msg.contains("`train.batch_size`"), "{msg}");
        assert!(msg.contains("typo.toml"), "{msg}");
        assert!(msg.contains("string"), "says what was found: {msg}");
        Ok(())
    });
}

#[test]
fn bad_enum_value_names_key() {
    Jail::expect_with(|jail| {
        jail.create_file("m.toml", "[train]\nmode = \"lorra\"\n")?;
        let msg = err_text(sources(Some("m.toml"), &[]).load().unwrap_err());
        assert!(
            msg.contains("`train.mode`") && msg.contains("m.toml"),
            "{msg}"
        );
        Ok(())
    });
}

#[test]
fn missing_file_and_bad_set_are_errors() {
    Jail::expect_with(|_jail| {
        let e = sources(Some("nope.toml"), &[]).load().unwrap_err();
        assert!(matches!(e, ConfigError::MissingFile(_)), "{e}");
        let e = sources(None, &["no-equals-sign"]).load().unwrap_err();
        assert!(matches!(e, ConfigError::BadOverride(_)), "{e}");
        Ok(())
    });
}

#[test]
fn shipped_example_configs_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            lmms_ft_core::config::from_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "expected an example per family, found {n}");
}
