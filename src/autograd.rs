//! Custom autograd functions for tch: make a Rust closure the backward of tensors you computed.
//!
//! tch has no custom autograd functions (tch-rs issues #70, #279, #437). [`record`] attaches a
//! `torch::autograd::Node` to outputs you computed yourself (with raw kernels, or any ops under
//! [`tch::no_grad`]); when `backward` reaches it, libtorch calls your closure with the gradients of
//! the outputs, and the closure returns one gradient per input. The fused losses of this crate use
//! exactly this.
//!
//! Rules:
//! - The closure runs on the autograd engine's thread (the device thread on CUDA): it must be
//!   `Send`. It is called at most once per backward; it is dropped when autograd frees the graph
//!   (after a backward without `retain_graph`, or when the outputs die).
//! - Never capture an output in the closure: that makes a reference cycle and leaks the graph.
//!   Capture inputs or whatever you need to recompute.
//! - An error or a panic in the closure, or a gradient of the wrong shape, makes `backward` fail
//!   with an error (use [`tch::Tensor::f_backward`] or `f_run_backward` to receive it).
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! use tch_detloss::autograd;
//!
//! // y = x^3 computed "by hand", with its backward 3 x^2 dy.
//! let x = Tensor::from_slice(&[1.0f64, 2.0, 3.0]).set_requires_grad(true);
//! let y = tch::no_grad(|| &x * &x * &x);
//! let saved = x.detach();
//! autograd::record("CubeBackward", &[&x], &[&y], move |grads: &[Tensor]| {
//!     Ok(vec![Some(&grads[0] * 3.0 * &saved * &saved)])
//! })?;
//! y.sum(Kind::Double).backward();
//! assert_eq!(Vec::<f64>::try_from(x.grad())?, vec![3.0, 12.0, 27.0]);
//! # anyhow::Ok(())
//! ```

use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, bail, Result};
use tch::Tensor;
use torch_sys::C_tensor;

type BackwardFnC = unsafe extern "C" fn(
    state: *mut c_void,
    grads_in: *mut *mut C_tensor,
    n_in: usize,
    grads_out: *mut *mut C_tensor,
    n_out: usize,
    err: *mut c_char,
    errlen: usize,
) -> c_int;
type DropFnC = unsafe extern "C" fn(state: *mut c_void);

extern "C" {
    fn dl_grad_enabled() -> c_int;
    fn dl_autograd_attach(
        name: *const c_char,
        inputs: *const *mut C_tensor,
        n_inputs: usize,
        outputs: *const *mut C_tensor,
        n_outputs: usize,
        saved: *const *mut C_tensor,
        n_saved: usize,
        state: *mut c_void,
        backward: BackwardFnC,
        drop: DropFnC,
        recorded: *mut c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// A backward closure: gradients of the outputs in, one optional gradient per input out.
pub trait BackwardFn: FnMut(&[Tensor]) -> Result<Vec<Option<Tensor>>> + Send + 'static {}
impl<F: FnMut(&[Tensor]) -> Result<Vec<Option<Tensor>>> + Send + 'static> BackwardFn for F {}

/// Whether autograd records operations on this thread (false inside [`tch::no_grad`]).
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag of libtorch.
    unsafe { dl_grad_enabled() != 0 }
}

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// How many backward closures are alive (recorded and not yet freed by autograd). Useful to
/// check that a training loop frees its graphs.
pub fn live_nodes() -> usize {
    LIVE.load(Ordering::SeqCst)
}

struct State {
    backward: Box<dyn BackwardFn>,
}

impl Drop for State {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

fn write_err(err: *mut c_char, errlen: usize, msg: &str) {
    if err.is_null() || errlen == 0 {
        return;
    }
    let bytes = msg.as_bytes();
    let n = bytes.len().min(errlen - 1);
    // SAFETY: the C++ side passes a buffer of errlen bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), err as *mut u8, n);
        *err.add(n) = 0;
    }
}

unsafe extern "C" fn backward_trampoline(
    state: *mut c_void,
    grads_in: *mut *mut C_tensor,
    n_in: usize,
    grads_out: *mut *mut C_tensor,
    n_out: usize,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    // SAFETY: grads_in holds n_in tensors allocated for us (we own them); state is our State.
    let grads: Vec<Tensor> = (0..n_in)
        .map(|i| unsafe { Tensor::from_ptr(*grads_in.add(i)) })
        .collect();
    let state = unsafe { &mut *(state as *mut State) };
    let result = catch_unwind(AssertUnwindSafe(|| (state.backward)(&grads)));
    let outs = match result {
        Ok(Ok(outs)) => outs,
        Ok(Err(e)) => {
            write_err(err, errlen, &format!("{e:#}"));
            return 1;
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            write_err(err, errlen, &format!("panic in backward: {msg}"));
            return 1;
        }
    };
    if outs.len() != n_out {
        write_err(
            err,
            errlen,
            &format!(
                "backward returned {} gradients for {} inputs",
                outs.len(),
                n_out
            ),
        );
        return 1;
    }
    for (i, g) in outs.into_iter().enumerate() {
        let p = match g {
            Some(mut t) => {
                let p = t.as_mut_ptr();
                std::mem::forget(t); // ownership passes to the C++ side
                p
            }
            None => std::ptr::null_mut(),
        };
        // SAFETY: grads_out has n_out slots.
        unsafe { *grads_out.add(i) = p };
    }
    0
}

unsafe extern "C" fn drop_trampoline(state: *mut c_void) {
    // SAFETY: state came from Box::into_raw below and is dropped exactly once by the C++ node.
    let state = unsafe { Box::from_raw(state as *mut State) };
    // A panic in a captured value's Drop must not unwind into C++.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(state)));
}

/// Makes `backward` the gradient function of `outputs`, with edges to `inputs`.
///
/// Returns `true` when something was recorded, `false` when no input requires a gradient or
/// grad mode is off (then `backward` is dropped at once). The outputs must not already have a
/// gradient function (compute them from raw kernels or under [`tch::no_grad`]). `backward`
/// receives one gradient per output (zeros for an output that did not reach the loss) and must
/// return one entry per input: `None` for no gradient.
///
/// `backward` runs with grad mode on exactly when the backward call has `create_graph` set: a
/// closure that computes its gradients from tch ops on tensors requiring grad then gives a
/// differentiable gradient; one that cannot should return an error when
/// [`grad_enabled`] is true rather than drop the second-order term.
pub fn record(
    name: &str,
    inputs: &[&Tensor],
    outputs: &[&Tensor],
    backward: impl BackwardFn,
) -> Result<bool> {
    record_saving(name, inputs, outputs, &[], backward)
}

/// [`record`], keeping autograd's guarantee for the tensors that `backward` reads: each tensor
/// in `saved` is remembered with its version counter, and if any of them is modified in place
/// between this call and the backward pass, `backward` fails with torch's own error ("one of
/// the variables needed for gradient computation has been modified by an inplace operation")
/// instead of computing from the changed values. Pass the tensors your closure captures (a
/// `detach()`ed tensor or a view shares the version counter of its original).
///
/// ```
/// use tch::{Kind, Tensor};
/// use tch_detloss::autograd;
///
/// let x = Tensor::from_slice(&[1.0f64, 2.0]).set_requires_grad(true);
/// let y = tch::no_grad(|| &x * &x);
/// let saved = x.detach();
/// autograd::record_saving("SquareBackward", &[&x], &[&y], &[&saved], {
///     let saved = saved.shallow_clone();
///     move |g: &[Tensor]| Ok(vec![Some(&g[0] * 2.0 * &saved)])
/// })?;
/// tch::no_grad(|| { let _ = x.detach().f_add_scalar_(1.0); }); // x changed in place
/// let err = y.sum(Kind::Double).f_backward().unwrap_err().to_string();
/// assert!(err.contains("modified by an inplace operation"), "{err}");
/// # anyhow::Ok(())
/// ```
pub fn record_saving(
    name: &str,
    inputs: &[&Tensor],
    outputs: &[&Tensor],
    saved: &[&Tensor],
    backward: impl BackwardFn,
) -> Result<bool> {
    let name_c =
        CString::new(name).map_err(|_| anyhow!("node name {name:?} contains a NUL byte"))?;
    if outputs.is_empty() {
        bail!("{name}: record needs at least one output");
    }
    let ins: Vec<*mut C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    let outs: Vec<*mut C_tensor> = outputs
        .iter()
        .map(|t| t.as_ptr() as *mut C_tensor)
        .collect();
    let saved: Vec<*mut C_tensor> = saved.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    LIVE.fetch_add(1, Ordering::SeqCst);
    let state = Box::into_raw(Box::new(State {
        backward: Box::new(backward),
    })) as *mut c_void;
    let mut recorded: c_int = 0;
    let mut err = vec![0 as c_char; 4096];
    // SAFETY: the pointers are live tch tensors; the C++ side takes ownership of `state` and
    // drops it through drop_trampoline exactly once, on every path.
    let rc = unsafe {
        dl_autograd_attach(
            name_c.as_ptr(),
            ins.as_ptr(),
            ins.len(),
            outs.as_ptr(),
            outs.len(),
            saved.as_ptr(),
            saved.len(),
            state,
            backward_trampoline,
            drop_trampoline,
            &mut recorded,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        // SAFETY: NUL-terminated by the C++ side.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        bail!("{name}: cannot record the autograd node: {msg}");
    }
    Ok(recorded != 0)
}
