//! The losses, one module per MMDetection loss file: `ae` (`ae_loss.py`:
//! AssociativeEmbeddingLoss), `focal` (`focal_loss.py`: FocalLoss,
//! FocalCustomLoss), `gfocal`
//! (`gfocal_loss.py`: QualityFocalLoss, DistributionFocalLoss), `varifocal`
//! (`varifocal_loss.py`), `cross_entropy` (`cross_entropy_loss.py`:
//! CrossEntropyLoss, CrossEntropyCustomLoss), `ddq_detr_aux` (`ddq_detr_aux_loss.py`:
//! DDQAuxLoss, which MMDetection does not register, nor does this), `gaussian_focal` (`gaussian_focal_loss.py`), `ghm` (`ghm_loss.py`: GHMC,
//! GHMR), `smooth_l1` (`smooth_l1_loss.py`: SmoothL1Loss, L1Loss), `balanced_l1`
//! (`balanced_l1_loss.py`), `iou` (`iou_loss.py`: IoULoss, GIoULoss, DIoULoss, CIoULoss, EIoULoss, SIoULoss,
//! BoundedIoULoss), `kd` (`kd_loss.py`), `dice` (`dice_loss.py`), `seesaw` (`seesaw_loss.py`),
//! `eqlv2` (`eqlv2_loss.py`), `multipos_cross_entropy` (`multipos_cross_entropy_loss.py`),
//! `triplet` (`triplet_loss.py`), `l2` (`l2_loss.py`, `margin_loss.py`: L2Loss, MarginL2Loss), `mse`
//! (`mse_loss.py`: MSELoss); and
//! `shortcut`, the zero-weight short-cut that L1, SmoothL1 and the IoU family share.
//!
//! Each struct's fields and defaults are the MMDetection class's constructor arguments; each
//! implements [`Loss`](crate::Loss) with the fused kernels and its stock-op composition.

pub mod ae;
pub mod balanced_l1;
pub mod cross_entropy;
pub mod ddq_detr_aux;
pub mod dice;
pub mod eqlv2;
pub mod focal;
pub mod gaussian_focal;
pub mod gfocal;
pub mod ghm;
pub mod iou;
pub mod kd;
pub mod l2;
pub mod mse;
pub mod multipos_cross_entropy;
pub mod seesaw;
mod shortcut;
pub mod smooth_l1;
pub mod triplet;
pub mod varifocal;

pub use ae::AssociativeEmbeddingLoss;
pub use balanced_l1::BalancedL1Loss;
pub use cross_entropy::{CrossEntropyCustomLoss, CrossEntropyLoss};
pub use ddq_detr_aux::{DDQAuxLoss, DDQAuxLosses, DDQAuxTargets};
pub use dice::DiceLoss;
pub use eqlv2::EQLV2Loss;
pub use focal::{FocalCustomLoss, FocalLoss};
pub use gaussian_focal::GaussianFocalLoss;
pub use gfocal::{DistributionFocalLoss, QualityFocalLoss};
pub use ghm::{GHMC, GHMR};
pub use iou::{BoundedIoULoss, CIoULoss, DIoULoss, EIoULoss, GIoULoss, IoULoss, SIoULoss};
pub use kd::KnowledgeDistillationKLDivLoss;
pub use l2::{L2Loss, MarginL2Loss};
pub use mse::MSELoss;
pub use multipos_cross_entropy::MultiPosCrossEntropyLoss;
pub use seesaw::SeesawLoss;
pub use smooth_l1::{L1Loss, SmoothL1Loss};
pub use triplet::TripletLoss;
pub use varifocal::VarifocalLoss;

/// The built-in losses, config `type` => struct, one line each: what the registry starts with.
/// Each struct is a config with MMDetection's keys and defaults and a `validate` of its
/// constructor's checks.
pub(crate) fn register_builtins(add: &mut dyn FnMut(&'static str, crate::registry::Builder)) {
    macro_rules! builtin {
        ($($name:literal => $ty:ty),* $(,)?) => {
            $(add($name, crate::registry::config_builder(|l: $ty| l.validate().map(|_| l)));)*
        };
    }
    builtin! {
        "FocalLoss" => FocalLoss,
        "QualityFocalLoss" => QualityFocalLoss,
        "VarifocalLoss" => VarifocalLoss,
        "CrossEntropyLoss" => CrossEntropyLoss,
        "DistributionFocalLoss" => DistributionFocalLoss,
        "GHMC" => GHMC,
        "L1Loss" => L1Loss,
        "SmoothL1Loss" => SmoothL1Loss,
        "BalancedL1Loss" => BalancedL1Loss,
        "IoULoss" => IoULoss,
        "GIoULoss" => GIoULoss,
        "DIoULoss" => DIoULoss,
        "CIoULoss" => CIoULoss,
        "GHMR" => GHMR,
        "MSELoss" => MSELoss,
        "EIoULoss" => EIoULoss,
        "SIoULoss" => SIoULoss,
        "FocalCustomLoss" => FocalCustomLoss,
        "CrossEntropyCustomLoss" => CrossEntropyCustomLoss,
        "GaussianFocalLoss" => GaussianFocalLoss,
        "BoundedIoULoss" => BoundedIoULoss,
        "KnowledgeDistillationKLDivLoss" => KnowledgeDistillationKLDivLoss,
        "DiceLoss" => DiceLoss,
        "SeesawLoss" => SeesawLoss,
        "EQLV2Loss" => EQLV2Loss,
        "MultiPosCrossEntropyLoss" => MultiPosCrossEntropyLoss,
        "TripletLoss" => TripletLoss,
        "L2Loss" => L2Loss,
        "MarginL2Loss" => MarginL2Loss,
        "AssociativeEmbeddingLoss" => AssociativeEmbeddingLoss,
    }
}

use anyhow::{bail, Result};
use tch::Tensor;

use crate::checks;
use crate::reduction::{check_avg_factor, Reduction};
use crate::{LossArgs, Target};

/// `impl Loss` for a loss composed of stock ops, from its inherent
/// `fn composed(&self, pred, target, args) -> Result<Tensor>`: [`Loss::forward`] and
/// [`Loss::forward_unfused`] are both that composition (the loss has no kernel, so its reference
/// is itself); the trait's other methods (state, parts, activation) follow in braces.
///
/// [`Loss`]: crate::Loss
/// [`Loss::forward`]: crate::Loss::forward
/// [`Loss::forward_unfused`]: crate::Loss::forward_unfused
macro_rules! composed_loss {
    ($ty:ty, $name:expr $(, { $($extra:tt)* })?) => {
        impl $crate::Loss for $ty {
            fn type_name(&self) -> &str {
                $name
            }

            /// The stock-op composition: this loss has no kernel.
            fn forward(
                &self,
                pred: &tch::Tensor,
                target: $crate::Target<'_>,
                args: &$crate::LossArgs<'_>,
            ) -> anyhow::Result<tch::Tensor> {
                self.composed(pred, target, args)
            }

            /// The same composition as [`Loss::forward`](crate::Loss::forward).
            fn forward_unfused(
                &self,
                pred: &tch::Tensor,
                target: $crate::Target<'_>,
                args: &$crate::LossArgs<'_>,
            ) -> anyhow::Result<tch::Tensor> {
                self.composed(pred, target, args)
            }

            $($($extra)*)?
        }
    };
}
pub(crate) use composed_loss;

/// The checks every loss call runs first, fused and unfused alike (the tensor checks below and
/// MMDetection's `avg_factor` rules, `check_avg_factor`); returns the reduction of this call.
pub(crate) fn begin(
    name: &str,
    pred: &Tensor,
    target: Target<'_>,
    args: &LossArgs<'_>,
    configured: Reduction,
) -> Result<Reduction> {
    check_tensors(name, pred, target, args)?;
    if args.ignore_index.is_some() && !name.starts_with(cross_entropy::NAME_STEM) {
        bail!("{name} takes no ignore_index (CrossEntropyLoss's call argument)");
    }
    if (args.pos_inds.is_some() || args.pos_labels.is_some()) && name != gaussian_focal::NAME {
        bail!("{name} takes no pos_inds or pos_labels (GaussianFocalLoss's call arguments)");
    }
    takes_no_corner_match(name, args)?;
    let reduction = args.reduction_override.unwrap_or(configured);
    check_avg_factor(name, reduction, args.avg_factor.as_ref())?;
    Ok(reduction)
}

/// Only AssociativeEmbeddingLoss takes a corner match.
pub(crate) fn takes_no_corner_match(name: &str, args: &LossArgs<'_>) -> Result<()> {
    if args.corner_match.is_some() && name != ae::NAME {
        bail!("{name} takes no corner_match (AssociativeEmbeddingLoss's match)");
    }
    Ok(())
}

/// For a loss whose call takes none of `weight`, `avg_factor`, `reduction_override`,
/// `ignore_index` and GaussianFocalLoss's positives (TripletLoss, AssociativeEmbeddingLoss):
/// an error naming its MMDetection signature if one is set.
pub(crate) fn takes_no_call_args(name: &str, args: &LossArgs<'_>, signature: &str) -> Result<()> {
    takes_no_corner_match(name, args)?;
    if args.weight.is_some()
        || args.avg_factor.is_some()
        || args.reduction_override.is_some()
        || args.ignore_index.is_some()
        || args.pos_inds.is_some()
        || args.pos_labels.is_some()
    {
        bail!("{name}: takes no weight, avg_factor, reduction, ignore_index or positives (MMDetection's {signature})");
    }
    Ok(())
}

/// The tensor checks of every loss call, before any loss-specific shape handling: every tensor
/// argument is readable, `pred` and scores are floating point, weights and dense targets are
/// real. Class-index targets are checked by the loss, which knows whether a tensor is one; the
/// `avg_factor` tensor by `check_avg_factor`.
fn check_tensors(name: &str, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<()> {
    checks::floating(name, "pred", pred)?;
    match target {
        Target::Tensor(t) => {
            checks::real(name, "target", t)?;
        }
        Target::LabelsScores { labels, scores } => {
            checks::integer(name, "labels", labels)?;
            checks::floating(name, "scores", scores)?;
        }
    }
    if let Some(w) = args.weight {
        checks::real(name, "weight", w)?;
    }
    Ok(())
}

/// MMDetection's `x.sum() * 0`: a zero that keeps `x` in the graph (with a zero gradient), the
/// result of a loss over nothing.
pub(crate) fn sum_times_zero(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_sum(None::<tch::Kind>)?.f_mul_scalar(0.0)?)
}

/// The sum of `terms` from left to right, as Python's `sum()` or a `+=` loop adds them; None
/// for no terms.
pub(crate) fn sum_in_order(terms: impl IntoIterator<Item = Tensor>) -> Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for t in terms {
        acc = Some(match acc {
            Some(a) => a.f_add(&t)?,
            None => t,
        });
    }
    Ok(acc)
}

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
pub(crate) fn bce(name: &str, prob: &Tensor, target: &Tensor) -> Result<Tensor> {
    checks::probabilities(name, prob)?;
    Ok(prob.f_binary_cross_entropy::<Tensor>(target, None, tch::Reduction::None)?)
}

/// MMDetection's `F.one_hot(labels, num_classes=C + 1)[:, :C]`, with its range check turned into
/// an error that names the valid range.
pub(crate) fn one_hot_without_background(name: &str, labels: &Tensor, c: i64) -> Result<Tensor> {
    checks::integer(name, "target", labels)?;
    if labels.dim() != 1 {
        bail!(
            "{name}: class-index target must be (N,), got shape {:?}",
            labels.size()
        );
    }
    let oh = labels.f_to_kind(tch::Kind::Int64)?.f_one_hot(c + 1).map_err(|e| {
        anyhow::anyhow!("{name}: class-index target outside [0, {c}] (0..{c} are classes, {c} is background): {e}")
    })?;
    Ok(oh.f_narrow(1, 0, c)?)
}

/// The one-hot `(N, C)` int64 rows of the `labels` (N,) where `mask` is true, zeros elsewhere,
/// made as MMDetection's `_expand_onehot_labels` makes them (`nonzero`, then an index put: host
/// reads, as theirs).
pub(crate) fn one_hot_where(labels: &Tensor, c: i64, mask: &Tensor) -> Result<Tensor> {
    let n = labels.size()[0];
    let device = labels.device();
    let bin_labels = labels.f_new_full([n, c], 0, (tch::Kind::Int64, device))?;
    let inds = mask.f_nonzero()?.f_squeeze_dim(1)?;
    if inds.numel() == 0 {
        return Ok(bin_labels);
    }
    let cols = labels.f_index(&[Some(&inds)])?;
    let ones = Tensor::f_ones([inds.numel() as i64], (tch::Kind::Int64, device))?;
    Ok(bin_labels.f_index_put(&[Some(&inds), Some(&cols)], &ones, false)?)
}

/// A weight that broadcasts against the loss of `shape` without adding dimensions to it (the
/// fused kernels write the loss's own shape; torch would silently grow the result).
pub(crate) fn check_weight_shape(name: &str, weight: &Tensor, shape: &[i64]) -> Result<()> {
    if weight.dim() > shape.len() || weight.f_expand(shape, false).is_err() {
        bail!(
            "{name}: weight of shape {:?} does not broadcast against the loss of shape {shape:?}",
            weight.size()
        );
    }
    Ok(())
}

pub(crate) use crate::checks::pred_shape;

/// torch's broadcasts of an element loss's call (target against pred, the weight against the
/// loss), as errors that name the argument.
pub(crate) fn check_broadcasts(
    name: &str,
    pred: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
) -> Result<()> {
    let loss = crate::checks::broadcast_shapes(&pred.size(), &target.size()).map_err(|e| {
        anyhow::anyhow!(
            "{name}: pred of shape {:?} and target of shape {:?} do not broadcast: {e}",
            pred.size(),
            target.size()
        )
    })?;
    if let Some(w) = weight {
        crate::checks::broadcast_shapes(&loss, &w.size()).map_err(|e| {
            anyhow::anyhow!(
                "{name}: weight of shape {:?} does not broadcast against the loss of shape \
                 {loss:?}: {e}",
                w.size()
            )
        })?;
    }
    Ok(())
}

/// The `(rows, columns)` view on which an element kernel runs a loss of pred's shape, or None
/// where MMDetection's call needs the stock composition: a target that is not pred's shape, an
/// empty or 0-dim pred, or a weight that would grow the loss (any weight that broadcasts
/// without growing it for a 2-D pred, none or one of pred's shape otherwise).
pub(crate) fn element_view(
    pred: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
) -> Option<[i64; 2]> {
    let shape = pred.size();
    if target.size() != shape || pred.numel() == 0 || shape.is_empty() {
        return None;
    }
    let last = *shape.last()?;
    let fits = |w: &Tensor| match shape.len() {
        2 => crate::checks::broadcast_shapes(&shape, &w.size()).is_ok_and(|out| out == shape),
        _ => w.size() == shape,
    };
    weight
        .is_none_or(fits)
        .then(|| [pred.numel() as i64 / last, last])
}

/// Runs an element kernel on the `view` of [`element_view`], giving the loss pred's shape back
/// for 'none'.
pub(crate) fn run_element_view(
    spec: crate::fused::Spec,
    view: [i64; 2],
    pred: &Tensor,
    target: &Tensor,
    args: &LossArgs<'_>,
) -> Result<Tensor> {
    use crate::fused::{self, KTarget};
    if pred.dim() == 2 {
        return fused::run(
            spec,
            pred,
            KTarget::Dense(target),
            args.weight,
            args.avg_factor.as_ref(),
        );
    }
    let reduction = spec.reduction;
    let w = args.weight.map(|w| w.f_reshape(view)).transpose()?;
    let out = fused::run(
        spec,
        &pred.f_reshape(view)?,
        KTarget::Dense(&target.f_reshape(view)?),
        w.as_ref(),
        args.avg_factor.as_ref(),
    )?;
    Ok(match reduction {
        Reduction::None => out.f_reshape(pred.size())?,
        _ => out,
    })
}

/// A weight broadcast against a per-row loss (N,), as the (N, 1) column the kernels take.
pub(crate) fn row_weight(name: &str, w: &Tensor, n: i64) -> Result<Tensor> {
    check_weight_shape(name, w, &[n])?;
    Ok(w.f_expand([n], false)?.f_unsqueeze(1)?)
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

/// A loss's constant vector (CrossEntropyLoss's `class_weight`) on the device and in the kind of
/// the last call: copied there once, not on every call as MMDetection's `new_tensor` does (a
/// host-to-device copy from pageable memory synchronizes).
#[derive(Default)]
pub struct DeviceCopy(std::sync::Mutex<Option<Tensor>>);

impl DeviceCopy {
    /// `values` as a `kind` tensor on `device`.
    pub(crate) fn get(
        &self,
        values: &[f64],
        kind: tch::Kind,
        device: tch::Device,
    ) -> Result<Tensor> {
        let mut cached = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("a cached device copy's lock is poisoned"))?;
        if let Some(t) = cached.as_ref() {
            if t.kind() == kind && t.device() == device && t.numel() == values.len() {
                return Ok(t.shallow_clone());
            }
        }
        let t = Tensor::from_slice(values)
            .f_to_kind(kind)?
            .f_to_device(device)?;
        *cached = Some(t.shallow_clone());
        Ok(t)
    }
}

impl Clone for DeviceCopy {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for DeviceCopy {
    /// A cache: always equal.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for DeviceCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCopy")
    }
}
