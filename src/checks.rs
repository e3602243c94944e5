//! The tensor checks that every loss runs first, fused and unfused alike (through
//! `losses::begin`), so that no tensor a user can build (any layout, kind, device, dimension
//! count) reaches a kernel or a stock op that would panic, abort or read memory it does not own.
//! A failed check is an error that names the loss, the argument, and what was passed.

use std::ffi::{c_char, c_int, CStr};

use anyhow::{bail, Result};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn dl_tensor_unsupported(t: *const C_tensor, err: *mut c_char, errlen: usize) -> c_int;
}

/// The kinds a floating-point `pred` may have (half types are computed in float32).
fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// The integer kinds accepted for class indices and counts.
fn is_integer(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    )
}

/// Kinds that convert exactly to a floating `pred` kind for targets, scores and weights.
fn is_real(kind: Kind) -> bool {
    is_float(kind) || is_integer(kind) || kind == Kind::Bool
}

/// A strided CPU or CUDA tensor with a kind tch knows; returns that kind.
pub(crate) fn readable(name: &str, what: &str, t: &Tensor) -> Result<Kind> {
    let mut err = [0 as c_char; 512];
    // SAFETY: `t` is a live tch tensor; the C++ side writes a NUL-terminated message into `err`.
    if unsafe { dl_tensor_unsupported(t.as_ptr(), err.as_mut_ptr(), err.len()) } != 0 {
        // SAFETY: NUL-terminated above.
        let why = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        bail!("{name}: {what} is {why}");
    }
    match t.f_kind() {
        Ok(k) => Ok(k),
        Err(e) => bail!("{name}: {what} has a kind tch does not know: {e}"),
    }
}

/// `readable`, and a kind that converts exactly to a floating point kind.
pub(crate) fn real(name: &str, what: &str, t: &Tensor) -> Result<Kind> {
    let kind = readable(name, what, t)?;
    if !is_real(kind) {
        bail!(
            "{name}: {what} must be a real tensor (floating point, integer or bool), got {kind:?}"
        );
    }
    Ok(kind)
}

/// `readable`, and a kind the kernels compute in: float32, float64, float16 or bfloat16.
pub(crate) fn floating(name: &str, what: &str, t: &Tensor) -> Result<Kind> {
    let kind = readable(name, what, t)?;
    if !is_float(kind) {
        bail!("{name}: {what} must be float32, float64, float16 or bfloat16, got {kind:?}");
    }
    Ok(kind)
}

/// `readable`, and an integer kind (class indices).
pub(crate) fn integer(name: &str, what: &str, t: &Tensor) -> Result<Kind> {
    let kind = readable(name, what, t)?;
    if !is_integer(kind) {
        bail!("{name}: {what} must be an integer tensor of class indices, got {kind:?}");
    }
    Ok(kind)
}

/// `(N, C)` of a classification `pred`, or an error naming the loss.
pub(crate) fn pred_shape(name: &str, pred: &Tensor) -> Result<(i64, i64)> {
    match pred.size()[..] {
        [n, c] => Ok((n, c)),
        _ => bail!("{name}: pred must be (N, C), got shape {:?}", pred.size()),
    }
}

/// MMDetection's `activated=True` losses call `F.binary_cross_entropy`, which takes
/// probabilities and rejects anything outside [0, 1] (NaN included) on the CPU; on CUDA it
/// would stop the process with a device assertion. The CPU paths and the stock-op compositions
/// check first (a host read, as the range check inside torch's CPU kernel).
pub(crate) fn probabilities(name: &str, p: &Tensor) -> Result<()> {
    let inside = p.f_ge(0.0)?.f_logical_and(&p.f_le(1.0)?)?;
    if !bool::try_from(inside.f_all()?)? {
        bail!("{name}: all elements of pred should be between 0 and 1 (activated=true takes probabilities)");
    }
    Ok(())
}

/// A meta tensor (shape and kind, no data) like `t`: for tests of these checks.
#[doc(hidden)]
pub fn meta_like(t: &Tensor) -> Result<Tensor> {
    extern "C" {
        fn dl_meta_like(t: *const C_tensor) -> *mut C_tensor;
    }
    // SAFETY: `t` is live; a non-null result is a new tensor that we own.
    let p = unsafe { dl_meta_like(t.as_ptr()) };
    if p.is_null() {
        bail!("cannot make a meta tensor of shape {:?}", t.size());
    }
    // SAFETY: p is a fresh at::Tensor* allocated with new by the C++ side.
    Ok(unsafe { Tensor::from_ptr(p) })
}

/// The broadcast of two shapes, or torch's own error for shapes that do not broadcast ("The size
/// of tensor a (6) must match the size of tensor b (3) at non-singleton dimension 1"), the message
/// MMDetection's users know from the same mistake.
pub(crate) fn broadcast_shapes(a: &[i64], b: &[i64]) -> anyhow::Result<Vec<i64>> {
    let n = a.len().max(b.len());
    // Sizes aligned from the right, 1 where a shape has fewer dimensions.
    let size = |s: &[i64], d: usize| (d + s.len()).checked_sub(n).map_or(1, |k| s[k]);
    let mut out = Vec::with_capacity(n);
    for d in 0..n {
        let (x, y) = (size(a, d), size(b, d));
        out.push(match (x, y) {
            _ if x == y => x,
            (1, _) => y,
            (_, 1) => x,
            _ => anyhow::bail!(
                "The size of tensor a ({x}) must match the size of tensor b ({y}) at non-singleton dimension {d}"
            ),
        });
    }
    Ok(out)
}
