//! Model resolution against a fabricated Hugging Face cache.

use std::fs;
use std::path::Path;

use lmms_ft_core::hub::{resolve_model_dir, CacheEnv, ResolveError};

const HUB_ID: &str = "Qwen/Qwen2-VL-7B-Instruct";

fn snapshot(hub: &Path, rev: &str) -> std::path::PathBuf {
    let dir = hub
        .join("models--Qwen--Qwen2-VL-7B-Instruct")
        .join("snapshots")
        .join(rev);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("config.json"), r#"{"model_type":"qwen2_vl"}"#).unwrap();
    dir
}

fn env_with_home(hf_home: &Path) -> CacheEnv {
    CacheEnv {
        hf_home: Some(hf_home.to_path_buf()),
        home: Some("/nonexistent-home".into()),
        ..Default::default()
    }
}

#[test]
fn refs_main_picks_the_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let _old = snapshot(&hub, "1111");
    let main = snapshot(&hub, "2222");
    let _newer = snapshot(&hub, "3333");
    let repo = hub.join("models--Qwen--Qwen2-VL-7B-Instruct");
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), "2222\n").unwrap();
    assert_eq!(
        resolve_model_dir(HUB_ID, None, &env_with_home(tmp.path())).unwrap(),
        main
    );
}

#[test]
fn without_refs_the_newest_complete_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let old = snapshot(&hub, "aaaa");
    let new = snapshot(&hub, "bbbb");
    let t = std::time::SystemTime::now();
    fs::File::open(&old)
        .unwrap()
        .set_modified(t - std::time::Duration::from_secs(3600))
        .unwrap();
    fs::File::open(&new).unwrap().set_modified(t).unwrap();
    // An incomplete snapshot (no config.json) is never chosen.
    fs::create_dir_all(hub.join("models--Qwen--Qwen2-VL-7B-Instruct/snapshots/cccc")).unwrap();
    assert_eq!(
        resolve_model_dir(HUB_ID, None, &env_with_home(tmp.path())).unwrap(),
        new
    );
}

#[test]
fn hub_cache_variable_wins_over_hf_home_and_xdg() {
    let tmp = tempfile::tempdir().unwrap();
    let chosen = snapshot(&tmp.path().join("explicit"), "r1");
    snapshot(&tmp.path().join("home/hub"), "r2");
    let env = CacheEnv {
        hf_hub_cache: Some(tmp.path().join("explicit")),
        hf_home: Some(tmp.path().join("home")),
        xdg_cache_home: Some(tmp.path().join("xdg")),
        home: None,
    };
    assert_eq!(resolve_model_dir(HUB_ID, None, &env).unwrap(), chosen);
    // XDG_CACHE_HOME, then HOME, are the fallbacks.
    let xdg = snapshot(&tmp.path().join("xdg/huggingface/hub"), "r3");
    let env = CacheEnv {
        xdg_cache_home: Some(tmp.path().join("xdg")),
        ..Default::default()
    };
    assert_eq!(resolve_model_dir(HUB_ID, None, &env).unwrap(), xdg);
    let home = snapshot(&tmp.path().join("h/.cache/huggingface/hub"), "r4");
    let env = CacheEnv {
        home: Some(tmp.path().join("h")),
        ..Default::default()
    };
    assert_eq!(resolve_model_dir(HUB_ID, None, &env).unwrap(), home);
}

#[test]
fn explicit_path_wins_and_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    snapshot(&tmp.path().join("hub"), "r1");
    let local = tmp.path().join("local");
    fs::create_dir_all(&local).unwrap();
    let env = env_with_home(tmp.path());
    match resolve_model_dir(HUB_ID, Some(&local), &env) {
        Err(ResolveError::BadPath { reason, .. }) => assert!(reason.contains("config.json")),
        other => panic!("expected BadPath, got {other:?}"),
    }
    fs::write(local.join("config.json"), "{}").unwrap();
    assert_eq!(
        resolve_model_dir(HUB_ID, Some(&local), &env).unwrap(),
        local
    );
}

#[test]
fn not_found_lists_where_it_looked_and_how_to_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let err = resolve_model_dir(HUB_ID, None, &env_with_home(tmp.path())).unwrap_err();
    let msg = err.to_string();
    let expected_dir = tmp
        .path()
        .join("hub/models--Qwen--Qwen2-VL-7B-Instruct/snapshots");
    assert!(msg.contains(&expected_dir.display().to_string()), "{msg}");
    assert!(msg.contains("--model-path"), "{msg}");
    assert!(msg.contains("HF_HOME"), "{msg}");
    assert!(msg.contains(HUB_ID), "{msg}");
}
