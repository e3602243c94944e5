//! The argument checks that every loss runs first, fused and unfused alike, so that no tensor a
//! user can build (any layout, kind, device, dimension count) reaches a kernel or a stock op that
//! would panic, abort or read memory it does not own. A failed check is an error that names the
//! loss, the argument, and what was passed.

use std::ffi::{c_char, c_int, CStr};

use anyhow::{bail, Result};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::{AvgFactor, LossArgs, Target};

extern "C" {
    fn dl_tensor_unsupported(t: *const C_tensor, err: *mut c_char, errlen: usize) -> c_int;
}

/// The kinds a floating-point `pred` may have (half types are computed in float32).
pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// The integer kinds accepted for class indices and counts.
pub(crate) fn is_integer(kind: Kind) -> bool {
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

/// `readable`, and an integer kind (class indices).
pub(crate) fn integer(name: &str, what: &str, t: &Tensor) -> Result<Kind> {
    let kind = readable(name, what, t)?;
    if !is_integer(kind) {
        bail!("{name}: {what} must be an integer tensor of class indices, got {kind:?}");
    }
    Ok(kind)
}

/// The checks shared by every loss call, before any loss-specific shape handling: every tensor
/// argument is readable, `pred` is floating point, weights, dense targets and scores are real,
/// `avg_factor` is a real one-element tensor. Class-index targets are checked by the loss, which
/// knows whether a tensor is one.
pub(crate) fn call(
    name: &str,
    pred: &Tensor,
    target: Target<'_>,
    args: &LossArgs<'_>,
) -> Result<()> {
    let kind = readable(name, "pred", pred)?;
    if !is_float(kind) {
        bail!("{name}: pred must be float32, float64, float16 or bfloat16, got {kind:?}");
    }
    match target {
        Target::Tensor(t) => {
            real(name, "target", t)?;
        }
        Target::LabelsScores { labels, scores } => {
            integer(name, "labels", labels)?;
            let k = readable(name, "scores", scores)?;
            if !is_float(k) {
                bail!("{name}: scores must be floating point, got {k:?}");
            }
        }
    }
    if let Some(w) = args.weight {
        real(name, "weight", w)?;
    }
    if let Some(AvgFactor::Tensor(t)) = &args.avg_factor {
        real(name, "avg_factor", t)?;
        if t.numel() != 1 {
            bail!(
                "{name}: avg_factor must be a number or a one-element tensor, got shape {:?}",
                t.size()
            );
        }
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
