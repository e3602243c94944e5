//! The losses, one module per MMDetection loss file: `focal` (`focal_loss.py`),
//! `quality_focal` (`gfocal_loss.py`), `varifocal` (`varifocal_loss.py`).
//!
//! Each struct's fields and defaults are the MMDetection class's constructor arguments; each
//! implements [`Loss`](crate::Loss) with the fused kernels and its stock-op composition.

pub mod focal;
pub mod quality_focal;
pub mod varifocal;

pub use focal::FocalLoss;
pub use quality_focal::QualityFocalLoss;
pub use varifocal::VarifocalLoss;

use anyhow::{bail, Result};
use tch::Tensor;

/// BCE-with-logits without reduction, as `F.binary_cross_entropy_with_logits(..., reduction='none')`.
pub(crate) fn bce_with_logits(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok(pred.f_binary_cross_entropy_with_logits::<Tensor>(
        target,
        None,
        None,
        tch::Reduction::None,
    )?)
}

/// `F.binary_cross_entropy(..., reduction='none')` on probabilities (log terms clamped at -100).
pub(crate) fn bce(prob: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok(prob.f_binary_cross_entropy::<Tensor>(target, None, tch::Reduction::None)?)
}

/// MMDetection's `F.one_hot(labels, num_classes=C + 1)[:, :C]`, with its range check turned into
/// an error that names the valid range.
pub(crate) fn one_hot_without_background(name: &str, labels: &Tensor, c: i64) -> Result<Tensor> {
    let oh = labels.f_one_hot(c + 1).map_err(|e| {
        anyhow::anyhow!("{name}: class-index target outside [0, {c}] (0..{c} are classes, {c} is background): {e}")
    })?;
    Ok(oh.narrow(1, 0, c))
}

/// `(N, C)` of a classification `pred`, or an error naming the loss.
pub(crate) fn pred_shape(name: &str, pred: &Tensor) -> Result<(i64, i64)> {
    match pred.size()[..] {
        [n, c] => Ok((n, c)),
        _ => bail!("{name}: pred must be (N, C), got shape {:?}", pred.size()),
    }
}

/// The target of a loss that takes one tensor.
pub(crate) fn single_target<'a>(name: &str, target: crate::Target<'a>) -> Result<&'a Tensor> {
    match target {
        crate::Target::Tensor(t) => Ok(t),
        crate::Target::LabelsScores { .. } => {
            bail!("{name} takes one target tensor, not (labels, scores)")
        }
    }
}
