//! lmms-ft core: the adapter contract ([`family`]), the link-time [`registry`], layered
//! [`config`], model resolution ([`hub`]), data handling ([`data`]) and logging.
//!
//! No module here names a model family: families plug in from adapter crates by
//! registering with [`register_family!`] and [`register_models!`].

pub mod autograd;
pub mod compose;
pub mod config;
pub mod data;
pub mod eval;
pub mod family;
pub mod generate;
pub mod hf_json;
pub mod hub;
pub mod logging;
pub mod loss;
pub mod nn;
pub mod part;
pub mod peft;
pub mod quant;
pub mod registry;
pub mod runtime;
pub mod testing;
pub mod train;
pub mod weights;

// Re-exported so the registration macros work in adapter crates without extra dependencies.
pub use inventory;
pub use tch;
