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
    // torch-sys asks for torch_cuda, but the linker's default --as-needed drops it because
    // no symbol is referenced directly; CUDA kernels then never register and libtorch
    // reports no GPU. Keep it whenever the wheel ships it, so one build serves CPU and GPU.
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
