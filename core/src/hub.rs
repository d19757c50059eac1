//! Finds a model's files on disk: an explicit directory first, then the Hugging Face cache
//! layout (`$HF_HUB_CACHE` or `$HF_HOME/hub`, default `~/.cache/huggingface/hub`), as
//! `huggingface_hub` writes it: `models--Org--Name/snapshots/<revision>/`, with
//! `refs/main` naming the revision. lmms-ft never downloads; the message says how to provide
//! the files instead.

use std::path::{Path, PathBuf};

/// Environment used for the look-up; separated so tests can fabricate it.
#[derive(Debug, Clone, Default)]
pub struct CacheEnv {
    pub hf_hub_cache: Option<PathBuf>,
    pub hf_home: Option<PathBuf>,
    pub xdg_cache_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
}

impl CacheEnv {
    pub fn from_process() -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        CacheEnv {
            hf_hub_cache: var("HF_HUB_CACHE"),
            hf_home: var("HF_HOME"),
            xdg_cache_home: var("XDG_CACHE_HOME"),
            home: var("HOME"),
        }
    }

    /// The hub cache directory, with the same precedence as `huggingface_hub`.
    pub fn hub_cache(&self) -> Option<PathBuf> {
        if let Some(p) = &self.hf_hub_cache {
            return Some(p.clone());
        }
        if let Some(p) = &self.hf_home {
            return Some(p.join("hub"));
        }
        if let Some(p) = &self.xdg_cache_home {
            return Some(p.join("huggingface").join("hub"));
        }
        self.home
            .as_ref()
            .map(|h| h.join(".cache").join("huggingface").join("hub"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("--model-path {path}: {reason}")]
    BadPath { path: PathBuf, reason: String },
    #[error("model files for {hub_id} not found. Looked in:\n{}\nProvide them with --model-path DIR (a folder holding config.json and *.safetensors), or put a Hugging Face snapshot of {hub_id} under {} (e.g. copy ~/.cache/huggingface/hub/{} from a machine that downloaded it with `hf download {hub_id}`); set HF_HOME or HF_HUB_CACHE if your cache lives elsewhere.", looked.iter().map(|l| format!("  - {l}")).collect::<Vec<_>>().join("\n"), cache.as_ref().map(|c| c.display().to_string()).unwrap_or_else(|| "$HF_HOME/hub".into()), repo_folder(hub_id))]
    NotFound {
        hub_id: String,
        looked: Vec<String>,
        cache: Option<PathBuf>,
    },
}

/// `Org/Name` → `models--Org--Name`, the cache folder name.
pub fn repo_folder(hub_id: &str) -> String {
    format!("models--{}", hub_id.replace('/', "--"))
}

fn check_model_dir(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err("is not a directory".into());
    }
    if !dir.join("config.json").is_file() {
        return Err("has no config.json".into());
    }
    Ok(())
}

/// Resolves the directory of a model: `model_path` if given (it must hold `config.json`),
/// else the snapshot of `hub_id` in the cache.
pub fn resolve_model_dir(
    hub_id: &str,
    model_path: Option<&Path>,
    env: &CacheEnv,
) -> Result<PathBuf, ResolveError> {
    if let Some(p) = model_path {
        check_model_dir(p).map_err(|reason| ResolveError::BadPath {
            path: p.to_path_buf(),
            reason,
        })?;
        return Ok(p.to_path_buf());
    }
    let cache = env.hub_cache();
    let mut looked = Vec::new();
    if let Some(cache) = &cache {
        let repo = cache.join(repo_folder(hub_id));
        let snapshots = repo.join("snapshots");
        // refs/main names the revision the last download resolved to.
        if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
            let dir = snapshots.join(rev.trim());
            match check_model_dir(&dir) {
                Ok(()) => return Ok(dir),
                Err(why) => looked.push(format!("{} ({why})", dir.display())),
            }
        }
        // Otherwise the most recently modified complete snapshot.
        let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| check_model_dir(p).is_ok())
            .map(|p| {
                let t = p
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (t, p)
            })
            .collect();
        candidates.sort();
        if let Some((_, p)) = candidates.pop() {
            return Ok(p);
        }
        looked.push(format!(
            "{} (no snapshot with config.json)",
            snapshots.display()
        ));
    } else {
        looked.push(
            "no Hugging Face cache: none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HOME is set"
                .into(),
        );
    }
    Err(ResolveError::NotFound {
        hub_id: hub_id.to_string(),
        looked,
        cache,
    })
}
