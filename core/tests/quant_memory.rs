//! Memory behaviour of the 4-bit linear: after a forward pass with the input requiring
//! grad, the autograd graph holds no weight-sized tensor (the backward dequantises again),
//! whereas the same layer run densely keeps the weight for its backward — the control that
//! shows the measurement sees such a tensor.

use lmms_ft_core::quant::{QuantOptions, QuantWeight};
use lmms_ft_core::tch::{Device, Kind, Tensor};

extern "C" {
    /// glibc: returns freed heap memory to the OS, so RSS reflects live allocations rather
    /// than what the allocator keeps cached from transient dequantisation buffers.
    fn malloc_trim(pad: usize) -> i32;
}

fn rss_mib() -> f64 {
    // SAFETY: glibc's malloc_trim only releases free memory.
    unsafe { malloc_trim(0) };
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1024.0
}

#[test]
fn backward_graph_keeps_no_dense_weight() {
    tch::manual_seed(3);
    let (out_f, in_f) = (8192, 4096);
    let dense_mib = (out_f * in_f * 4) as f64 / (1 << 20) as f64; // 128 MiB fp32
    let q = {
        let w = Tensor::randn([out_f, in_f], (Kind::Float, Device::Cpu)) * 0.02;
        QuantWeight::quantize(&w, &QuantOptions::default()).unwrap()
    };
    let x = Tensor::randn([4, in_f], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    // Warm-up, so one-off allocations do not count.
    q.linear(&x, None).unwrap().sum(Kind::Float).backward();
    let x = x.detach().set_requires_grad(true);

    let before = rss_mib();
    let y = q.linear(&x, None).unwrap();
    let kept = rss_mib() - before;
    let dense_graph = x.linear::<Tensor>(&q.dequantize(Kind::Float).unwrap(), None);
    let kept_dense = rss_mib() - before - kept;
    eprintln!(
        "dense weight {dense_mib:.0} MiB; graph of the 4-bit layer keeps {kept:.1} MiB, \
         a dense layer's graph {kept_dense:.1} MiB"
    );
    assert!(
        kept_dense > 0.8 * dense_mib,
        "control: the dense graph should hold the {dense_mib:.0} MiB weight, measured {kept_dense:.1}"
    );
    assert!(
        kept < 0.05 * dense_mib,
        "the 4-bit layer's graph holds {kept:.1} MiB (dense weight: {dense_mib:.0} MiB)"
    );
    // And its backward still works, with the dense layer's gradient.
    let x2 = x.detach().set_requires_grad(true);
    let g = Tensor::randn([4, out_f], (Kind::Float, Device::Cpu));
    (&y * &g).sum(Kind::Float).backward();
    let ours = x.grad().copy();
    (x2.linear::<Tensor>(&q.dequantize(Kind::Float).unwrap(), None) * &g)
        .sum(Kind::Float)
        .backward();
    let _ = dense_graph;
    let diff = (ours - x2.grad()).abs().max().double_value(&[]);
    assert!(diff < 1e-3, "input gradient differs by {diff}");
}
