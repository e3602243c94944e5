//! MMDetection's zero-weight short-cut, shared by L1Loss, SmoothL1Loss and the IoU family: when a
//! weight is given and none of it is > 0, the loss returns `(pred * weight).sum()` (with
//! `weight.unsqueeze(1)` when pred has one dimension more), neither reduced nor scaled by
//! `loss_weight`, whatever the reduction, and its gradient is the weight.
//!
//! MMDetection reads `torch.any(weight > 0)` back to the host on every call. The fused path
//! decides it on the device instead (`Spec::shortcut`: the forward pass counts the positive
//! weights and its finalize picks the result), except where MMDetection's result *shape* depends
//! on the data, which no device flag can reproduce: reduction 'none' (a scalar instead of the
//! element-wise loss) and a weight that only the short-cut accepts (one that does not broadcast
//! against the loss). There, [`plan`] reads the decision back once, as MMDetection does.

use anyhow::Result;
use tch::Tensor;

use crate::reduction::Reduction;

/// Whether no weight is > 0: a host read, except for an empty weight (trivially none).
pub(crate) fn no_positive(weight: &Tensor) -> Result<bool> {
    if weight.numel() == 0 {
        return Ok(true);
    }
    Ok(!bool::try_from(weight.f_gt(0.0)?.f_any()?)?)
}

/// The weight as MMDetection's short-cut multiplies it into pred: `weight.unsqueeze(1)` when
/// pred has one dimension more than the weight.
pub(crate) fn view(pred: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if pred.dim() == weight.dim() + 1 {
        Ok(weight.f_unsqueeze(1)?)
    } else {
        Ok(weight.shallow_clone())
    }
}

/// The short-cut in stock ops, as MMDetection writes it.
pub(crate) fn unfused(pred: &Tensor, weight: &Tensor) -> Result<Tensor> {
    Ok(pred.f_mul(&view(pred, weight)?)?.f_sum(pred.kind())?)
}

/// How a fused call with a short-cut runs.
pub(crate) enum Plan {
    /// The loss, with the short-cut decided on the device where a weight is given.
    Fused,
    /// The short-cut, decided on the host: the fused kernels' 'sum' with this weight view, in
    /// which no weight is > 0, so that they return `sum(pred * weight)` and its gradient.
    Taken(Tensor),
}

/// Decides how a fused call runs. `none_too`: the loss takes the short-cut for reduction 'none'
/// as well (all but IoULoss). `normal`: whether the loss itself accepts the weight, else the
/// error it raises when the short-cut does not apply.
pub(crate) fn plan(
    pred: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    none_too: bool,
    normal: Result<()>,
) -> Result<Plan> {
    let Some(w) = weight else {
        normal?;
        return Ok(Plan::Fused);
    };
    if (reduction == Reduction::None && none_too) || normal.is_err() {
        // The one host read, where the result's shape depends on it.
        if no_positive(w)? {
            return Ok(Plan::Taken(view(pred, w)?));
        }
    }
    normal?;
    Ok(Plan::Fused)
}
