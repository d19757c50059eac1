//! Build-script helpers shared by every lmms-ft crate whose binaries or tests touch libtorch.
//!
//! tch's own build script puts an rpath only on its static C++ part, so a binary that links
//! libtorch dynamically would need `LD_LIBRARY_PATH` at run time. Calling
//! [`link_libtorch_rpath`] from a crate's `build.rs` embeds the libtorch directory in that
//! crate's binaries, tests and examples instead. The crate must depend on `torch-sys`
//! directly: only direct dependents see `DEP_TCH_LIBTORCH_LIB`.

/// Embeds the libtorch library directory (as found by torch-sys) as an rpath.
///
/// Panics (which is how a build script reports failure) if torch-sys did not export the
/// directory, since a binary built without it fails at start-up with a loader error.
pub fn link_libtorch_rpath() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "DEP_TCH_LIBTORCH_LIB is not set: add `torch-sys` as a direct dependency of this crate",
    );
    // `--enable-new-dtags` would write RUNPATH, which is not consulted for the
    // dependencies of libtorch itself (libc10, libtorch_cuda, ...); plain RPATH is.
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
