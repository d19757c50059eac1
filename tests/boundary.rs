//! The core names no family: no adapter crate, family name, `model_type`, architecture,
//! composer or layout (nor a composer's or layout's settings) appears in the core library
//! (`core/src`) or in the binary's code (`src/`, except `src/adapters.rs`, the link list).
//! Every forbidden word is taken from what the linked adapters register, so a new family is
//! checked without editing this test. Adding a family therefore edits nothing outside its
//! crate but the workspace member list, the binary's dependency line and its link line.

use std::path::{Path, PathBuf};

use lmms_ft_adapters as _;
use lmms_ft_core::{compose, registry};

/// Words of the core's own vocabulary that a composer's settings reuse: `train.projector`
/// (the `Component`) and the Hub's `chat_template.jinja`. Everything else a composer or a
/// layout takes is checked.
const CORE_WORDS: &[&str] = &["projector", "chat_template"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `word` occurs in `line` with no identifier character on either side.
fn has_word(line: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices(word).any(|(i, _)| {
        !line[..i].chars().next_back().is_some_and(ident)
            && !line[i + word.len()..].chars().next().is_some_and(ident)
    })
}

#[test]
fn the_core_and_the_binary_name_no_family() {
    let families = registry::families();
    assert!(!families.is_empty(), "the adapters register families");
    // Anywhere, comments included: crate names, quoted names and model types, architectures.
    let mut anywhere: Vec<String> = Vec::new();
    // In code (not comments): the words themselves, e.g. a composer's `text_model` field.
    let mut in_code: Vec<String> = Vec::new();
    let mut crates: Vec<&str> = registry::models()
        .iter()
        .map(|m| m.registered_by)
        .chain(families.iter().map(|f| f.registered_by))
        .chain(compose::composers().iter().map(|c| c.registered_by))
        .chain(compose::layouts().iter().map(|l| l.registered_by))
        .chain(registry::demos().iter().map(|d| d.registered_by))
        .map(|path| path.split("::").next().unwrap())
        .collect();
    crates.sort_unstable();
    crates.dedup();
    for krate in &crates {
        anywhere.push(krate.to_string());
        anywhere.push(krate.replace('_', "-"));
    }
    for f in &families {
        for name in std::iter::once(&f.name).chain(f.model_types) {
            anywhere.push(format!("\"{name}\""));
            in_code.push(name.to_string());
        }
        anywhere.extend(f.architectures.iter().map(|a| a.to_string()));
    }
    for c in compose::composers() {
        anywhere.push(format!("\"{}\"", c.kind));
        in_code.extend(c.settings.iter().map(|s| s.to_string()));
    }
    for l in compose::layouts() {
        anywhere.push(format!("\"{}\"", l.name));
        in_code.extend(l.settings.iter().map(|s| s.to_string()));
    }
    for d in registry::demos() {
        anywhere.push(format!("\"{}\"", d.name));
    }
    in_code.retain(|w| !CORE_WORDS.contains(&w.as_str()));
    // Keys like `vision_tower` must also not appear as `model.vision_tower` in messages.
    anywhere.extend(in_code.iter().filter(|w| w.contains('_')).cloned());
    assert!(
        crates.len() >= 2 && in_code.iter().any(|w| w.contains('_')),
        "the forbidden words come from real registrations: {crates:?} {in_code:?}"
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("core/src"), &mut files);
    rust_files(&root.join("src"), &mut files);
    files.retain(|f| !f.ends_with("src/adapters.rs") || f.starts_with(root.join("core")));
    assert!(files.len() > 20, "found the sources: {files:?}");
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            let is_comment = code.starts_with("//");
            let hits = anywhere.iter().filter(|w| line.contains(w.as_str()));
            let code_hits = in_code
                .iter()
                .filter(|w| !is_comment && has_word(line, w.as_str()));
            for word in hits.chain(code_hits) {
                found.push(format!(
                    "{}:{}: `{word}` in {line:?}",
                    file.strip_prefix(root).unwrap().display(),
                    n + 1
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "family names in the core:\n{}",
        found.join("\n")
    );
}
