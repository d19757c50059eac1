// Every crate whose binaries or tests link libtorch embeds its rpath; see lmms-ft-build.
fn main() {
    lmms_ft_build::link_libtorch_rpath();
}
