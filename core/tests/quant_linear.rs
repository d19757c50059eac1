//! The QLoRA base layer (`nn::Linear` with a 4-bit `quant` weight): forward and input
//! gradient equal a dense linear on the dequantised weight, and bitsandbytes' `Linear4bit`
//! (`scripts/oracle/quant_linear_bnb.py`, CPU); LoRA on top behaves as on a dense layer; a
//! 4-bit base refuses merging.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lmms_ft_core::nn::{Linear, LoraAdapter};
use lmms_ft_core::quant::{dequantize_4bit, quantize_4bit, QuantOptions, QuantType, QuantWeight};
use lmms_ft_core::tch::{Device, Kind, Tensor};
use lmms_ft_core::testing::run_oracle;

/// max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30)
}

fn opts(qt: QuantType, nested: bool, compute: Option<Kind>) -> QuantOptions {
    QuantOptions {
        quant_type: qt,
        double_quant: nested,
        blocksize: 64,
        compute_dtype: compute,
    }
}

/// Output and input gradient of `f` for input `x` and output gradient `g`.
fn run(x: &Tensor, g: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let y = f(&x);
    (&y * g).sum(Kind::Double).backward();
    (y.detach(), x.grad())
}

#[test]
fn matches_a_dense_linear_on_the_dequantised_weight() {
    tch::manual_seed(1);
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for nested in [false, true] {
            for kind in [Kind::Float, Kind::BFloat16] {
                let w = Tensor::randn([96, 200], (Kind::Float, Device::Cpu)) * 0.05;
                let bias = Tensor::randn([96], (Kind::Float, Device::Cpu)).to_kind(kind);
                let q = QuantWeight::quantize(&w.to_kind(kind), &opts(qt, nested, None)).unwrap();
                let dense = q.dequantize(kind).unwrap();
                let x = Tensor::randn([3, 7, 200], (Kind::Float, Device::Cpu)).to_kind(kind);
                let g = Tensor::randn([3, 7, 96], (Kind::Float, Device::Cpu)).to_kind(kind);
                let (y, gx) = run(&x, &g, |x| q.linear(x, Some(&bias)).unwrap());
                let (yd, gxd) = run(&x, &g, |x| x.linear(&dense, Some(&bias)));
                let (ry, rg) = (rel(&y, &yd), rel(&gx, &gxd));
                eprintln!("{qt} nested={nested} {kind:?}: forward {ry:.2e}, grad {rg:.2e}");
                assert!(
                    ry <= 1e-5,
                    "{qt} {nested} {kind:?}: forward differs by {ry}"
                );
                assert!(
                    rg <= 1e-5,
                    "{qt} {nested} {kind:?}: input grad differs by {rg}"
                );
            }
        }
    }
}

#[test]
fn chunked_quantisation_equals_one_shot() {
    tch::manual_seed(4);
    // 2.1 M values: three chunks, an odd count and a partial last block.
    for kind in [Kind::Float, Kind::BFloat16] {
        for nested in [false, true] {
            let w = (Tensor::randn([1031, 2049], (Kind::Float, Device::Cpu)) * 0.05).to_kind(kind);
            let o = opts(QuantType::Nf4, nested, None);
            let q = QuantWeight::quantize(&w, &o).unwrap();
            let (packed, state) = quantize_4bit(&w, o.quant_type, o.blocksize, nested).unwrap();
            assert!(
                q.packed.equal(&packed),
                "{kind:?} {nested}: packed codes differ"
            );
            assert!(
                q.state
                    .absmax_f32()
                    .unwrap()
                    .equal(&state.absmax_f32().unwrap()),
                "{kind:?} {nested}: block scales differ"
            );
            assert!(q
                .dequantize(kind)
                .unwrap()
                .equal(&dequantize_4bit(&packed, &state).unwrap()));
        }
    }
}

#[test]
fn lora_on_a_4bit_base_equals_lora_on_the_dense_base() {
    tch::manual_seed(2);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let w = Tensor::randn([48, 64], (Kind::Float, Device::Cpu)) * 0.05;
    let q = QuantWeight::quantize(&w, &QuantOptions::default()).unwrap();
    let dense = q.dequantize(Kind::Float).unwrap();
    let training = Arc::new(AtomicBool::new(false));
    let a = Tensor::randn([4, 64], (Kind::Float, Device::Cpu)) * 0.1;
    let b = Tensor::randn([48, 4], (Kind::Float, Device::Cpu)) * 0.1;
    let make = |quant: bool| {
        let mut l = Linear::new(
            &(vs.root() / if quant { "q" } else { "d" }),
            64,
            48,
            false,
            lmms_ft_core::nn::ParamInit::Zeros,
        );
        tch::no_grad(|| l.weight.copy_(&dense));
        if quant {
            l.quant = Some(q.shallow_clone());
        }
        l.lora = Some(LoraAdapter {
            a: a.copy().set_requires_grad(true),
            b: b.copy().set_requires_grad(true),
            scaling: 2.0,
            dropout: 0.0,
            training: training.clone(),
        });
        l
    };
    let (lq, ld) = (make(true), make(false));
    let x = Tensor::randn([2, 5, 64], (Kind::Float, Device::Cpu));
    let g = Tensor::randn([2, 5, 48], (Kind::Float, Device::Cpu));
    let (yq, gq) = run(&x, &g, |x| lq.forward(x));
    let (yd, gd) = run(&x, &g, |x| ld.forward(x));
    assert!(rel(&yq, &yd) <= 1e-6 && rel(&gq, &gd) <= 1e-6);
    for (name, tq, td) in [
        (
            "lora_A",
            &lq.lora.as_ref().unwrap().a,
            &ld.lora.as_ref().unwrap().a,
        ),
        (
            "lora_B",
            &lq.lora.as_ref().unwrap().b,
            &ld.lora.as_ref().unwrap().b,
        ),
    ] {
        let r = rel(&tq.grad(), &td.grad());
        assert!(r <= 1e-6, "{name} grad differs by {r}");
    }
    // The frozen 4-bit base gets no gradient.
    assert!(!lq.weight.grad().defined());
    let mut lq = lq;
    let err = lq.merge_lora().unwrap_err().to_string();
    assert!(err.contains("4-bit"), "{err}");
}

#[test]
fn matches_bitsandbytes_linear4bit_forward_and_backward() {
    let dir = tempfile::tempdir().unwrap();
    run_oracle("quant_linear_bnb.py", &[dir.path().to_str().unwrap()]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cases.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["bitsandbytes"], "0.50.2");
    let t: HashMap<String, Tensor> = Tensor::read_safetensors(dir.path().join("cases.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let cases = manifest["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let get = |k: &str| t[&format!("{name}/{k}")].shallow_clone();
        let qt: QuantType = c["quant_type"].as_str().unwrap().parse().unwrap();
        let nested = c["nested"].as_bool().unwrap();
        let compute = match c["compute"].as_str().unwrap() {
            "float32" => Kind::Float,
            _ => Kind::BFloat16,
        };
        let q = QuantWeight::quantize(&get("w"), &opts(qt, nested, Some(compute))).unwrap();
        assert!(
            q.packed.reshape([-1]).equal(&get("packed").reshape([-1])),
            "{name}: packed codes differ from bnb's Params4bit"
        );
        let bias = get("bias");
        let (y, gx) = run(&get("x"), &get("g"), |x| q.linear(x, Some(&bias)).unwrap());
        let (ry, rg) = (rel(&y, &get("y")), rel(&gx, &get("x_grad")));
        eprintln!("{name} {qt} nested={nested} {compute:?}: forward {ry:.2e}, grad {rg:.2e}");
        // fp32: the same dequantised weight and an fp32 matmul on both sides (summation
        // order only). bf16: both round the product to bf16, whose unit in the last place is
        // 2^-8 of the value, and add the bias in a different order; allow two ulps of the
        // largest magnitude.
        let tol = if compute == Kind::Float {
            1e-5
        } else {
            2.0 / 256.0
        };
        assert!(ry <= tol, "{name}: forward differs from bnb by {ry}");
        assert!(rg <= tol, "{name}: input grad differs from bnb by {rg}");
    }
}
