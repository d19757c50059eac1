//! The adapter crates linked into `lmms-ft`: one line per family crate, the only place besides
//! `Cargo.toml`'s dependency line where the binary names one. Linking is what registers a
//! family (inventory collects at link time); the commands only talk to the core's registry.
//! A library, so the binary's tests can link the same set and compare against it.

use lmms_ft_llava as _;
use lmms_ft_mllama as _;
use lmms_ft_phi3_v as _;
use lmms_ft_qwen2_vl as _;
use lmms_ft_qwen3_vl as _;
