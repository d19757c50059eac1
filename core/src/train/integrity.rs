//! Whether a checkpoint on disk is the one that was saved: every checkpoint gets a manifest
//! of its files' sizes and CRC-32 checksums, written last (after every file is synced), and
//! a checkpoint is trusted only after its files match it. CRC-32 rather than a cryptographic
//! hash because the threat is truncation and bit rot, not forgery, and a full fine-tuning
//! checkpoint of a 7B model (weights plus two AdamW moments) is tens of gigabytes that must
//! be hashed at every save.
//!
//! Also here: what a failed save reports (how much space it needed, how much there was), and
//! the two failure-injection hooks the tests drive the save path with. They are read only by
//! [`super::Trainer::save_checkpoint`] and do nothing unless set:
//!
//! - `LMMS_FT_TEST_DISK_BYTES=N` makes the save behave as if the output directory's
//!   filesystem held `N` bytes: a save that would bring everything under the output
//!   directory past `N` leaves its largest file cut at the limit and fails with the
//!   operating system's "no space left on device". For machines where a small tmpfs cannot
//!   be mounted.
//! - `LMMS_FT_TEST_STALL_SAVE=STEP` stops the save of step `STEP` halfway (the tensors are
//!   written, the manifest is not), creates `<output_dir>/stalled-in-save` and sleeps, so a
//!   test can SIGKILL the process inside a save.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The manifest's name inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "checkpoint_manifest.json";
/// See the module docs.
pub const DISK_BYTES_ENV: &str = "LMMS_FT_TEST_DISK_BYTES";
/// See the module docs.
pub const STALL_SAVE_ENV: &str = "LMMS_FT_TEST_STALL_SAVE";
/// The file [`STALL_SAVE_ENV`] creates in the output directory once the save has stalled.
pub const STALLED_MARKER: &str = "stalled-in-save";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    bytes: u64,
    crc32: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, Entry>,
}

/// Size and CRC-32 of a file, read in 1 MiB pieces.
fn checksum(path: &Path) -> Result<Entry> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(Entry {
        bytes,
        crc32: format!("{:08x}", hasher.finalize()),
    })
}

fn files_of(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: a file name that is not UTF-8", path.display()))?
            .to_string();
        if name != MANIFEST_FILE {
            files.push((name, path));
        }
    }
    files.sort();
    Ok(files)
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// Syncs every file of `dir` to disk and writes their manifest (synced too); returns the
/// checkpoint's total size in bytes.
pub fn write_manifest(dir: &Path) -> Result<u64> {
    let mut files = BTreeMap::new();
    for (name, path) in files_of(dir)? {
        ensure_file(&path)?;
        sync(&path)?;
        files.insert(name, checksum(&path)?);
    }
    let total = files.values().map(|e| e.bytes).sum();
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&Manifest { files })?;
    let mut file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    sync(dir)?;
    Ok(total)
}

fn ensure_file(path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!(
            "{} is not a plain file; a checkpoint holds files only",
            path.display()
        );
    }
    Ok(())
}

/// Whether a checkpoint's files are those its save wrote: `Ok(true)` when they match the
/// manifest, `Ok(false)` for a checkpoint without one (written before lmms-ft kept
/// manifests; it cannot be checked), an error naming the first file that is missing, cut
/// short or altered.
pub fn verify(dir: &Path) -> Result<bool> {
    let path = dir.join(MANIFEST_FILE);
    if !path.exists() {
        return Ok(false);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is damaged: it does not parse", path.display()))?;
    for (name, want) in &manifest.files {
        let file = dir.join(name);
        let size = match std::fs::metadata(&file) {
            Ok(m) => m.len(),
            Err(e) => bail!("{} is missing ({e})", file.display()),
        };
        if size != want.bytes {
            bail!(
                "{} is truncated or damaged: it has {size} bytes, the save wrote {}",
                file.display(),
                want.bytes
            );
        }
        let got = checksum(&file)?;
        if got.crc32 != want.crc32 {
            bail!(
                "{} is damaged: its CRC-32 is {}, the save wrote {}",
                file.display(),
                got.crc32,
                want.crc32
            );
        }
    }
    Ok(true)
}

/// Bytes of every file under `dir` (recursively).
fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn fake_disk() -> Option<u64> {
    std::env::var(DISK_BYTES_ENV).ok()?.trim().parse().ok()
}

/// Free bytes on the filesystem of `dir` for an unprivileged writer (as `df` reports them),
/// or under [`DISK_BYTES_ENV`] what that pretend disk has left.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    if let Some(limit) = fake_disk() {
        return Some(limit.saturating_sub(du(dir)));
    }
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` only writes into the zeroed struct we own; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The [`DISK_BYTES_ENV`] hook, called once a save's files are in `tmp` (inside `out`): when
/// the pretend disk is over its size, cuts the largest file of `tmp` to what would have fit
/// and fails as the write would have.
pub fn injected_disk_full(out: &Path, tmp: &Path) -> Result<()> {
    let Some(limit) = fake_disk() else {
        return Ok(());
    };
    let used = du(out);
    if used <= limit {
        return Ok(());
    }
    let mut files = files_of(tmp)?;
    files.sort_by_key(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    let (_, largest) = files.pop().context("an empty checkpoint directory")?;
    let len = std::fs::metadata(&largest)?.len();
    let keep = len.saturating_sub(used - limit);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&largest)
        .and_then(|f| f.set_len(keep))
        .with_context(|| format!("cutting {}", largest.display()))?;
    Err(
        anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOSPC))
            .context(format!("writing {}", largest.display())),
    )
}

/// The [`STALL_SAVE_ENV`] hook: sleeps inside the save of `step` until killed.
pub fn injected_stall(out: &Path, step: u64) {
    let wanted = std::env::var(STALL_SAVE_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if wanted == Some(step) {
        let _ = std::fs::write(out.join(STALLED_MARKER), b"");
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}

/// `n` bytes for people: `1.4 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Whether an error chain holds an out-of-space (or over-quota) write failure.
pub fn is_out_of_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
            .is_some_and(|code| code == libc::ENOSPC || code == libc::EDQUOT)
    })
}
