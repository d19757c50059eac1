//! The C++ autograd shim against libtorch's own autograd as the oracle: gradients through
//! checkpointed blocks (with dropout, so the RNG replay matters) equal those of the plain
//! graph, hand-written backwards equal autograd's, the random stream after backward is the
//! one a plain run leaves, closures are freed with their graph, and Rust panics surface as
//! errors instead of aborting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The tests seed and draw from libtorch's global generator, which parallel test threads
/// would otherwise interleave.
static RNG: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

use lmms_ft_core::autograd::{checkpoint, custom_function, recomputations};
use lmms_ft_core::testing::max_abs_diff;
use tch::{Kind, Tensor};

const WIDTH: i64 = 32;
const LAYERS: usize = 6;
const DROPOUT: f64 = 0.3;

fn layer(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    x.linear(w, Some(b)).gelu("none").dropout(DROPOUT, true)
}

fn params() -> Vec<(Tensor, Tensor)> {
    tch::manual_seed(7);
    (0..LAYERS)
        .map(|_| {
            let w = (Tensor::randn([WIDTH, WIDTH], (Kind::Float, tch::Device::Cpu)) * 0.3)
                .set_requires_grad(true);
            let b = (Tensor::randn([WIDTH], (Kind::Float, tch::Device::Cpu)) * 0.1)
                .set_requires_grad(true);
            (w, b)
        })
        .collect()
}

struct Run {
    loss: f64,
    grads: Vec<Tensor>,
    input_grad: Option<Tensor>,
    /// A draw from the global generator right after backward.
    next_draw: Tensor,
}

fn run(params: &[(Tensor, Tensor)], x: &Tensor, checkpointed: bool, seed: i64) -> Run {
    for (w, b) in params {
        for mut t in [w.shallow_clone(), b.shallow_clone()] {
            t.zero_grad();
        }
    }
    let x = x.detach().set_requires_grad(x.requires_grad());
    tch::manual_seed(seed);
    let mut h = x.shallow_clone();
    for (w, b) in params {
        h = if checkpointed {
            let (w, b) = (w.shallow_clone(), b.shallow_clone());
            checkpoint(&[&h], move |xs| layer(&xs[0], &w, &b))
        } else {
            layer(&h, w, b)
        };
    }
    let loss = (&h * &h).mean(Kind::Float) + h.sin().sum(Kind::Float);
    loss.backward();
    let next_draw = Tensor::rand([16], (Kind::Float, tch::Device::Cpu));
    let grads = params
        .iter()
        .flat_map(|(w, b)| [w.grad().copy(), b.grad().copy()])
        .collect();
    let g = x.grad();
    Run {
        loss: loss.double_value(&[]),
        grads,
        input_grad: g.defined().then(|| g.copy()),
        next_draw,
    }
}

fn assert_same(plain: &Run, ckpt: &Run) {
    assert!(
        (plain.loss - ckpt.loss).abs() <= 1e-6,
        "loss {} vs {}",
        plain.loss,
        ckpt.loss
    );
    for (i, (a, b)) in plain.grads.iter().zip(&ckpt.grads).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d <= 1e-6, "gradient {i} differs by {d}");
        assert!(
            a.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "gradient {i} is zero: the comparison would be vacuous"
        );
    }
    match (&plain.input_grad, &ckpt.input_grad) {
        (Some(a), Some(b)) => {
            let d = max_abs_diff(a, b);
            assert!(d <= 1e-6, "input gradient differs by {d}");
        }
        (None, None) => {}
        _ => panic!("input gradient present in one run only"),
    }
    assert_eq!(
        max_abs_diff(&plain.next_draw, &ckpt.next_draw),
        0.0,
        "checkpointing shifted the random stream after backward"
    );
}

#[test]
fn checkpointed_stack_with_dropout_matches_plain_gradients() {
    let _serial = serial();
    let params = params();
    let x = Tensor::randn([4, 8, WIDTH], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let plain = run(&params, &x, false, 42);
    let before = recomputations();
    let ckpt = run(&params, &x, true, 42);
    assert!(
        recomputations() - before >= LAYERS as u64,
        "each checkpointed layer must be recomputed in backward"
    );
    assert_same(&plain, &ckpt);
    // Dropout really draws from the generator here (another seed changes the loss), so equal
    // gradients above mean the recomputation replayed the same masks.
    let other = run(&params, &x, false, 43);
    assert!((other.loss - plain.loss).abs() > 1e-4);
}

/// The first decoder layer under LoRA: its input (frozen embeddings) needs no gradient, but
/// parameters inside the checkpointed closure do.
#[test]
fn parameters_inside_get_gradients_when_the_input_needs_none() {
    let _serial = serial();
    let params = params();
    let x = Tensor::randn([3, 5, WIDTH], (Kind::Float, tch::Device::Cpu));
    let plain = run(&params, &x, false, 5);
    let ckpt = run(&params, &x, true, 5);
    assert!(plain.input_grad.is_none());
    assert_same(&plain, &ckpt);
}

#[test]
fn checkpoint_under_no_grad_records_nothing() {
    let _serial = serial();
    let params = params();
    let x = Tensor::randn([2, WIDTH], (Kind::Float, tch::Device::Cpu));
    let (w, b) = (params[0].0.shallow_clone(), params[0].1.shallow_clone());
    let y = tch::no_grad(|| checkpoint(&[&x], move |xs| xs[0].linear(&w, Some(&b))));
    assert!(!y.requires_grad());
    let expected = tch::no_grad(|| x.linear(&params[0].0, Some(&params[0].1)));
    assert_eq!(max_abs_diff(&y, &expected), 0.0);
}

#[test]
fn custom_function_backward_matches_autograd_and_is_freed_with_the_graph() {
    let _serial = serial();
    tch::manual_seed(3);
    let x = Tensor::randn([5, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let w = Tensor::randn([5, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let dropped = Arc::new(AtomicBool::new(false));
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let flag = Flag(dropped.clone());
    // Two outputs, y1 = x³·w and y2 = x + w, with their gradients written by hand.
    let outs = custom_function(
        &[&x, &w],
        |xs| vec![xs[0].pow_tensor_scalar(3) * &xs[1], &xs[0] + &xs[1]],
        move |xs, gs| {
            let _keep = &flag;
            let (x, w) = (&xs[0], &xs[1]);
            let gx = &gs[0] * x.pow_tensor_scalar(2) * 3 * w + &gs[1];
            let gw = &gs[0] * x.pow_tensor_scalar(3) + &gs[1];
            vec![Some(gx), Some(gw)]
        },
    )
    .unwrap();
    assert_eq!(outs.len(), 2);
    let loss = (&outs[0] * 2.0).sum(Kind::Float) + outs[1].cos().sum(Kind::Float);
    loss.backward();
    let (gx, gw) = (x.grad().copy(), w.grad().copy());

    let (x2, w2) = (
        x.detach().set_requires_grad(true),
        w.detach().set_requires_grad(true),
    );
    let reference =
        (x2.pow_tensor_scalar(3) * &w2 * 2.0).sum(Kind::Float) + (&x2 + &w2).cos().sum(Kind::Float);
    reference.backward();
    assert!((loss.double_value(&[]) - reference.double_value(&[])).abs() <= 1e-5);
    assert!(max_abs_diff(&gx, &x2.grad()) <= 1e-5);
    assert!(max_abs_diff(&gw, &w2.grad()) <= 1e-5);

    assert!(
        !dropped.load(Ordering::SeqCst),
        "the graph still holds the closure"
    );
    drop(loss);
    drop(outs);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the backward closure must be freed with its graph"
    );
}

#[test]
fn custom_function_records_nothing_without_inputs_that_require_grad() {
    let _serial = serial();
    let x = Tensor::ones([3], (Kind::Float, tch::Device::Cpu));
    let dropped = Arc::new(AtomicBool::new(false));
    let d = dropped.clone();
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let flag = Flag(d);
    let outs = custom_function(
        &[&x],
        |xs| vec![&xs[0] * 2.0],
        move |_, _| {
            let _keep = &flag;
            vec![None]
        },
    )
    .unwrap();
    assert!(!outs[0].requires_grad());
    assert_eq!(Vec::<f32>::try_from(&outs[0]).unwrap(), vec![2.0, 2.0, 2.0]);
    assert!(dropped.load(Ordering::SeqCst));
}

#[test]
fn panics_in_rust_callbacks_become_errors() {
    let _serial = serial();
    let x = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let err = custom_function(&[&x], |_| panic!("forward exploded"), |_, _| vec![None])
        .expect_err("a panicking forward is an error");
    assert!(err.to_string().contains("forward exploded"), "{err}");

    let outs = custom_function(
        &[&x],
        |xs| vec![&xs[0] * 3.0],
        |_, _| panic!("backward exploded"),
    )
    .unwrap();
    let err = outs[0]
        .sum(Kind::Float)
        .f_backward()
        .expect_err("a panicking backward is an error");
    assert!(err.to_string().contains("backward exploded"), "{err}");
}
