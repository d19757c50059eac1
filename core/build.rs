// Every crate whose binaries or tests link libtorch embeds its rpath; see lmms-ft-build.
// This crate also compiles the C++ autograd shim (`csrc/`) against the same libtorch that
// torch-sys found, since tch offers no custom autograd of its own.
use std::path::PathBuf;

fn main() {
    lmms_ft_build::link_libtorch_rpath();
    println!("cargo:rerun-if-changed=csrc/autograd_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/dequant_4bit.cpp");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("DEP_TCH_LIBTORCH_LIB is not set: torch-sys must be a direct dependency"),
    );
    // torch-sys exports only the lib dir; both the wheel and a libtorch download keep the
    // headers in the sibling `include`.
    let include = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/autograd_shim.cpp")
        .file("csrc/dequant_4bit.cpp")
        // The dequantisation loop is the hot path of a QLoRA step on CPU.
        .opt_level(3)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // One OpenMP runtime with ATen (see csrc/dequant_4bit.cpp).
        .flag("-fopenmp")
        // libtorch's headers trip many warnings that are not ours to fix.
        .flag("-w")
        .compile("lmms_ft_autograd_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
    // The wheel's own OpenMP runtime (by file name: the wheel has no `libgomp.so` link), so
    // `-fopenmp` code shares libtorch's thread pool instead of loading the system copy.
    println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
}
