//! Custom autograd functions and gradient checkpointing, which tch does not offer.
//!
//! Both rest on one C++ `torch::autograd::Function` (`core/csrc/autograd_shim.cpp`) whose
//! forward and backward call back into Rust. [`custom_function`] exposes it directly (a
//! forward plus a hand-written backward, e.g. a 4-bit linear that dequantises again in
//! backward instead of keeping the dense weight alive); [`checkpoint`] builds PyTorch's
//! re-entrant checkpoint on it: run a closure without keeping its activations, then in
//! backward run it again under grad with the RNG state of the first run (so dropout draws the
//! same masks) and backpropagate through the recomputation.
//!
//! Closures are `'static + Send` because the graph keeps them until it is dropped, and the
//! autograd engine may call backward from its own worker thread (CUDA). Model code captures
//! shallow clones of the parameters it needs ([`ShallowClone`]), which share storage and
//! gradients with the originals.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tch::{Device, Kind, TchError, Tensor};
use torch_sys::C_tensor;

use crate::nn::{Embedding, Linear, LoraAdapter, RmsNorm};

type ForwardCb =
    unsafe extern "C" fn(*mut c_void, *const *mut C_tensor, i64, *mut c_void, *mut c_void) -> c_int;
type BackwardCb = unsafe extern "C" fn(
    *mut c_void,
    *const *mut C_tensor,
    i64,
    *const *mut C_tensor,
    i64,
    *mut c_void,
    *mut c_void,
) -> c_int;
type DropCb = unsafe extern "C" fn(*mut c_void);

extern "C" {
    fn lmms_shim_free_str(s: *mut c_char);
    fn lmms_shim_string_set(err: *mut c_void, msg: *const c_char, len: usize);
    fn lmms_shim_list_push(list: *mut c_void, t: *mut C_tensor);
    fn lmms_shim_grad_enabled() -> c_int;
    fn lmms_shim_take_grad(t: *mut C_tensor) -> *mut C_tensor;
    #[allow(clippy::too_many_arguments)]
    fn lmms_shim_apply(
        inputs: *const *mut C_tensor,
        n_inputs: i64,
        fwd_state: *mut c_void,
        fwd: ForwardCb,
        bwd_state: *mut c_void,
        bwd: BackwardCb,
        drop: DropCb,
        out: *mut *mut *mut C_tensor,
        n_out: *mut i64,
    ) -> *mut c_char;
    fn lmms_shim_free_array(arr: *mut *mut C_tensor);
    fn lmms_shim_backward(
        outputs: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        n: i64,
    ) -> *mut c_char;
    fn lmms_shim_rng_get(device_type: c_int, index: i64, state: *mut *mut C_tensor) -> *mut c_char;
    fn lmms_shim_rng_set(device_type: c_int, index: i64, state: *mut C_tensor) -> *mut c_char;
}

/// Number of checkpointed recomputations run so far in this process; lets tests and
/// benchmarks confirm that checkpointing really happened rather than silently falling back.
static RECOMPUTATIONS: AtomicU64 = AtomicU64::new(0);

pub fn recomputations() -> u64 {
    RECOMPUTATIONS.load(Ordering::Relaxed)
}

/// Whether autograd records operations on this thread (tch has no query for it).
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { lmms_shim_grad_enabled() != 0 }
}

/// Takes the `.grad` a backward pass accumulated into `t`, leaving none (PyTorch's
/// `p.grad = None`), or `None` when no gradient reached it. tch can only zero a gradient,
/// which keeps its memory and makes an unreached parameter look like one with a zero grad.
pub fn take_grad(t: &Tensor) -> Option<Tensor> {
    // SAFETY: `t` is a valid tensor; the shim returns an owned heap tensor or null.
    let g = unsafe { lmms_shim_take_grad(ptr(t)) };
    (!g.is_null()).then(|| unsafe { Tensor::from_ptr(g) })
}

fn check(err: *mut c_char) -> Result<(), TchError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error is a NUL-terminated string malloc'd by the shim.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { lmms_shim_free_str(err) };
    Err(TchError::Torch(msg))
}

fn ptr(t: &Tensor) -> *mut C_tensor {
    // The shim only copies the `at::Tensor` handle (a refcount increment), never mutates it.
    t.as_ptr() as *mut C_tensor
}

/// Owned tensors from borrowed `at::Tensor*` the shim passes to a callback.
///
/// SAFETY: `ptrs` must point to `n` valid `at::Tensor*` for the duration of the call.
unsafe fn borrow_tensors(ptrs: *const *mut C_tensor, n: i64) -> Vec<Tensor> {
    (0..n as usize)
        .map(|i| Tensor::from_ptr(torch_sys::at_shallow_clone(*ptrs.add(i))))
        .collect()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a Rust callback of a custom autograd function panicked".to_string()
    }
}

/// Runs a callback body, turning a panic into an error for the shim (unwinding into C++
/// would be undefined behaviour).
fn guarded(err: *mut c_void, body: impl FnOnce()) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(()) => 0,
        Err(payload) => {
            let msg = panic_message(payload.as_ref());
            // SAFETY: `err` is the std::string* the shim handed to the callback.
            unsafe { lmms_shim_string_set(err, msg.as_ptr() as *const c_char, msg.len()) };
            1
        }
    }
}

/// A backward computation: given the saved inputs and the gradients of the outputs, the
/// gradient of each input (`None` where it has none).
trait Backward: Send + 'static {
    fn backward(&mut self, inputs: &[Tensor], grads: &[Tensor]) -> Vec<Option<Tensor>>;
}

impl<F> Backward for F
where
    F: FnMut(&[Tensor], &[Tensor]) -> Vec<Option<Tensor>> + Send + 'static,
{
    fn backward(&mut self, inputs: &[Tensor], grads: &[Tensor]) -> Vec<Option<Tensor>> {
        self(inputs, grads)
    }
}

struct ForwardState<'a, B, Fw> {
    forward: Option<Fw>,
    backward: &'a Mutex<B>,
}

unsafe extern "C" fn forward_trampoline<B, Fw>(
    state: *mut c_void,
    inputs: *const *mut C_tensor,
    n: i64,
    outputs: *mut c_void,
    err: *mut c_void,
) -> c_int
where
    B: Backward,
    Fw: FnOnce(&Mutex<B>, &[Tensor]) -> Vec<Tensor>,
{
    guarded(err, || {
        // SAFETY: `state` is the ForwardState that `apply` keeps alive across the call.
        let state = unsafe { &mut *(state as *mut ForwardState<'_, B, Fw>) };
        let inputs = unsafe { borrow_tensors(inputs, n) };
        let forward = state
            .forward
            .take()
            .expect("the shim calls forward once per apply");
        for t in forward(state.backward, &inputs) {
            unsafe { lmms_shim_list_push(outputs, ptr(&t)) };
        }
    })
}

unsafe extern "C" fn backward_trampoline<B: Backward>(
    state: *mut c_void,
    inputs: *const *mut C_tensor,
    n_inputs: i64,
    grads: *const *mut C_tensor,
    n_grads: i64,
    grad_inputs: *mut c_void,
    err: *mut c_void,
) -> c_int {
    guarded(err, || {
        // SAFETY: `state` is the boxed Mutex<B> owned by the graph node until `drop`.
        let backward = unsafe { &*(state as *const Mutex<B>) };
        let inputs = unsafe { borrow_tensors(inputs, n_inputs) };
        let grads = unsafe { borrow_tensors(grads, n_grads) };
        let mut guard = backward.lock().unwrap_or_else(|e| e.into_inner());
        for g in guard.backward(&inputs, &grads) {
            let p = g.as_ref().map_or(std::ptr::null_mut(), ptr);
            unsafe { lmms_shim_list_push(grad_inputs, p) };
        }
    })
}

unsafe extern "C" fn drop_trampoline<B>(state: *mut c_void) {
    // SAFETY: called exactly once by the shim, for the Box made in `apply`. A panicking Drop
    // must not unwind into C++.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        drop(unsafe { Box::from_raw(state as *mut Mutex<B>) })
    }));
}

/// Applies the shim's Function. `forward` runs synchronously (with grad disabled, as in any
/// autograd Function) and may use the backward state; the backward state then belongs to the
/// graph node, or is dropped at once when nothing is recorded.
fn apply<B, Fw>(inputs: &[Tensor], backward: B, forward: Fw) -> Result<Vec<Tensor>, TchError>
where
    B: Backward,
    Fw: FnOnce(&Mutex<B>, &[Tensor]) -> Vec<Tensor>,
{
    let bwd = Box::into_raw(Box::new(Mutex::new(backward)));
    // SAFETY: the box stays alive at least until lmms_shim_apply returns: the shim frees it
    // only through `drop_trampoline`, after forward has run.
    let mut fwd_state = ForwardState {
        forward: Some(forward),
        backward: unsafe { &*bwd },
    };
    let in_ptrs: Vec<*mut C_tensor> = inputs.iter().map(ptr).collect();
    let mut out: *mut *mut C_tensor = std::ptr::null_mut();
    let mut n_out: i64 = 0;
    let err = unsafe {
        lmms_shim_apply(
            in_ptrs.as_ptr(),
            in_ptrs.len() as i64,
            &mut fwd_state as *mut ForwardState<'_, B, Fw> as *mut c_void,
            forward_trampoline::<B, Fw>,
            bwd as *mut c_void,
            backward_trampoline::<B>,
            drop_trampoline::<B>,
            &mut out,
            &mut n_out,
        )
    };
    check(err)?;
    // SAFETY: on success `out` holds `n_out` heap tensors that now belong to us.
    let outputs = (0..n_out as usize)
        .map(|i| unsafe { Tensor::from_ptr(*out.add(i)) })
        .collect();
    unsafe { lmms_shim_free_array(out) };
    Ok(outputs)
}

/// A differentiable function with a hand-written backward.
///
/// `forward` maps the inputs to outputs (run with grad disabled, nothing of it is kept);
/// `backward` receives the inputs again and the gradients of the outputs (zeros for outputs
/// that did not reach the loss) and returns one gradient per input (`None` for inputs that
/// need none). The graph keeps only the inputs and `backward`'s captures, which is the point:
/// a quantised layer can recompute its dense weight in backward instead of keeping it alive.
/// As with any autograd Function, nothing is recorded unless an input requires grad.
pub fn custom_function<Fw, Bw>(
    inputs: &[&Tensor],
    forward: Fw,
    backward: Bw,
) -> Result<Vec<Tensor>, TchError>
where
    Fw: FnOnce(&[Tensor]) -> Vec<Tensor>,
    Bw: FnMut(&[Tensor], &[Tensor]) -> Vec<Option<Tensor>> + Send + 'static,
{
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
    apply(&inputs, backward, |_, xs: &[Tensor]| forward(xs))
}

/// `torch::autograd::backward(outputs, grads)`: backpropagates several outputs at once,
/// accumulating into the `.grad` of every leaf reached.
pub fn backward_multi(outputs: &[Tensor], grads: &[Tensor]) -> Result<(), TchError> {
    if outputs.len() != grads.len() {
        return Err(TchError::Torch(format!(
            "{} outputs but {} gradients",
            outputs.len(),
            grads.len()
        )));
    }
    let outs: Vec<*mut C_tensor> = outputs.iter().map(ptr).collect();
    let gs: Vec<*mut C_tensor> = grads.iter().map(ptr).collect();
    check(unsafe { lmms_shim_backward(outs.as_ptr(), gs.as_ptr(), outs.len() as i64) })
}

/// The default generators' states: the CPU one always, and each CUDA device an input lives
/// on, as `torch.utils.checkpoint` stashes them.
struct RngState {
    cpu: Tensor,
    cuda: Vec<(i64, Tensor)>,
}

impl RngState {
    fn capture(cuda_devices: &[i64]) -> Result<RngState, TchError> {
        let get = |device_type: c_int, index: i64| -> Result<Tensor, TchError> {
            let mut state: *mut C_tensor = std::ptr::null_mut();
            check(unsafe { lmms_shim_rng_get(device_type, index, &mut state) })?;
            Ok(unsafe { Tensor::from_ptr(state) })
        };
        let cuda = cuda_devices
            .iter()
            .map(|&i| Ok((i, get(1, i)?)))
            .collect::<Result<_, TchError>>()?;
        Ok(RngState {
            cpu: get(0, 0)?,
            cuda,
        })
    }

    fn restore(&self) -> Result<(), TchError> {
        check(unsafe { lmms_shim_rng_set(0, 0, ptr(&self.cpu)) })?;
        for (i, s) in &self.cuda {
            check(unsafe { lmms_shim_rng_set(1, *i, ptr(s)) })?;
        }
        Ok(())
    }
}

/// Puts the generators back as they were when dropped, so a recomputation does not shift
/// the random stream of the rest of the backward pass (`torch.random.fork_rng`).
struct RngFork(RngState);

impl Drop for RngFork {
    fn drop(&mut self) {
        if let Err(e) = self.0.restore() {
            tracing::error!("restoring the RNG state after a checkpoint recomputation: {e}");
        }
    }
}

fn cuda_devices(inputs: &[&Tensor]) -> Vec<i64> {
    let mut out: Vec<i64> = inputs
        .iter()
        .filter_map(|t| match t.device() {
            Device::Cuda(i) => Some(i as i64),
            _ => None,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

struct Checkpointed<F> {
    f: F,
    rng: RngState,
    /// Inputs the caller passed; a trailing placeholder input may follow them.
    n_inputs: usize,
}

impl<F> Backward for Checkpointed<F>
where
    F: Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static,
{
    fn backward(&mut self, inputs: &[Tensor], grads: &[Tensor]) -> Vec<Option<Tensor>> {
        let detached: Vec<Tensor> = inputs[..self.n_inputs]
            .iter()
            .map(|x| x.detach().set_requires_grad(x.requires_grad()))
            .collect();
        let outputs = {
            let devices: Vec<i64> = self.rng.cuda.iter().map(|(i, _)| *i).collect();
            let _fork = RngFork(RngState::capture(&devices).expect("reading the RNG state"));
            self.rng
                .restore()
                .expect("restoring the checkpoint's RNG state");
            RECOMPUTATIONS.fetch_add(1, Ordering::Relaxed);
            tch::with_grad(|| (self.f)(&detached))
        };
        let (outs, gs): (Vec<Tensor>, Vec<Tensor>) = outputs
            .into_iter()
            .zip(grads.iter())
            .filter(|(o, g)| o.requires_grad() && g.defined())
            .map(|(o, g)| (o, g.shallow_clone()))
            .unzip();
        if !outs.is_empty() {
            backward_multi(&outs, &gs).expect("backward through a checkpoint recomputation");
        }
        let mut result: Vec<Option<Tensor>> = detached
            .iter()
            .map(|d| {
                let g = d.grad();
                g.defined().then_some(g)
            })
            .collect();
        result.resize_with(inputs.len(), || None);
        result
    }
}

/// Runs `f` on `inputs` without keeping its intermediate activations; backward runs it again
/// (same RNG state, grad enabled) and backpropagates, so memory holds only each checkpoint's
/// inputs. Parameters `f` captures receive their gradients during that inner backward, as
/// with PyTorch's re-entrant checkpoint (so use `loss.backward()`, not `autograd.grad`).
///
/// With grad disabled this is just `f(inputs)`. With grad enabled it always records, even
/// when no input requires grad (a placeholder input that requires grad is added), because
/// the parameters inside may train while the input does not (LoRA on the first decoder
/// layer); callers skip checkpointing blocks with nothing trainable, which would otherwise
/// be recomputed for nothing.
pub fn checkpoint<F>(inputs: &[&Tensor], f: F) -> Tensor
where
    F: Fn(&[Tensor]) -> Tensor + Send + 'static,
{
    let mut outs = f_checkpoint_multi(inputs, move |xs| vec![f(xs)])
        .unwrap_or_else(|e| panic!("gradient checkpoint: {e}"));
    outs.pop().expect("one output")
}

/// [`checkpoint`] for closures with several outputs, with errors returned rather than
/// panicking.
pub fn f_checkpoint_multi<F>(inputs: &[&Tensor], f: F) -> Result<Vec<Tensor>, TchError>
where
    F: Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static,
{
    let mut all: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
    if !grad_enabled() {
        return Ok(f(&all));
    }
    let state = Checkpointed {
        rng: RngState::capture(&cuda_devices(inputs))?,
        f,
        n_inputs: inputs.len(),
    };
    if !inputs.iter().any(|t| t.requires_grad()) {
        all.push(Tensor::empty([0], (Kind::Float, Device::Cpu)).set_requires_grad(true));
    }
    let n = inputs.len();
    apply(
        &all,
        state,
        move |st: &Mutex<Checkpointed<F>>, xs: &[Tensor]| {
            let st = st.lock().unwrap_or_else(|e| e.into_inner());
            (st.f)(&xs[..n])
        },
    )
}

/// A handle sharing storage (and gradients) with the original, for closures the autograd
/// graph keeps past the borrow of the module that made them.
pub trait ShallowClone {
    fn shallow_clone(&self) -> Self;
}

impl ShallowClone for Tensor {
    fn shallow_clone(&self) -> Self {
        Tensor::shallow_clone(self)
    }
}

impl<T: ShallowClone> ShallowClone for Option<T> {
    fn shallow_clone(&self) -> Self {
        self.as_ref().map(T::shallow_clone)
    }
}

impl ShallowClone for LoraAdapter {
    fn shallow_clone(&self) -> Self {
        LoraAdapter {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            scaling: self.scaling,
            dropout: self.dropout,
            training: self.training.clone(),
        }
    }
}

impl ShallowClone for Linear {
    fn shallow_clone(&self) -> Self {
        Linear {
            weight: self.weight.shallow_clone(),
            bias: ShallowClone::shallow_clone(&self.bias),
            lora: ShallowClone::shallow_clone(&self.lora),
            quant: self.quant.as_ref().map(|q| q.shallow_clone()),
        }
    }
}

impl ShallowClone for RmsNorm {
    fn shallow_clone(&self) -> Self {
        RmsNorm {
            weight: self.weight.shallow_clone(),
            eps: self.eps,
        }
    }
}

impl ShallowClone for Embedding {
    fn shallow_clone(&self) -> Self {
        Embedding {
            weight: self.weight.shallow_clone(),
        }
    }
}

/// Whether any of `tensors` requires grad: a block with no trainable parameter and an input
/// that needs no gradient gains nothing from checkpointing.
pub fn any_requires_grad<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> bool {
    tensors.into_iter().any(|t| t.requires_grad())
}

/// The tensors of a [`Linear`] (weight, bias, LoRA factors), for [`any_requires_grad`].
pub fn linear_tensors(l: &Linear) -> impl Iterator<Item = &Tensor> {
    std::iter::once(&l.weight)
        .chain(l.bias.iter())
        .chain(l.lora.iter().flat_map(|a| [&a.a, &a.b]))
}
