fn main() {
    lmms_ft_build::link_libtorch_rpath();
}
