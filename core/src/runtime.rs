//! Device choice and a libtorch self-check.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Parses `auto`, `cpu`, `cuda`, `cuda:N`. `auto` picks CUDA device 0 when libtorch sees one.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    Ok(match spec.as_str() {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..]
                .parse()
                .map_err(|_| anyhow::anyhow!("bad device '{spec}': expected cuda:N"))?;
            Device::Cuda(n)
        }
        _ => bail!("unknown device '{spec}' (expected auto, cpu, cuda or cuda:N)"),
    })
}

/// What `lmms-ft doctor` reports.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub cudnn_available: bool,
    pub cpu_threads: i32,
    pub device: String,
    /// Max abs difference between an autograd gradient and its closed form.
    pub autograd_check_error: f64,
}

/// Runs a small forward/backward on `device` and checks the gradient against its closed
/// form, proving libtorch loads, computes and differentiates.
pub fn self_check(device: Device) -> Result<Report> {
    let x = Tensor::randn([64, 32], (Kind::Float, device)).set_requires_grad(true);
    let w = Tensor::randn([32, 16], (Kind::Float, device));
    // loss = sum((x @ w)^2) → dloss/dx = 2 (x @ w) @ wᵀ
    let y = x.matmul(&w);
    let loss = (&y * &y).sum(Kind::Float);
    loss.backward();
    let expected = (y.detach() * 2.0).matmul(&w.tr());
    let err = (x.grad() - expected).abs().max().double_value(&[]);
    Ok(Report {
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        cpu_threads: tch::get_num_threads(),
        device: format!("{device:?}"),
        autograd_check_error: err,
    })
}
