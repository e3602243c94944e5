//! mmdet/models/losses/gfocal_loss.py, the losses of GFL: [`QualityFocalLoss`] (kernel body
//! `kernels/quality_focal.cuh`) and [`DistributionFocalLoss`] (`kernels/distribution_focal.cuh`).

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{bce, bce_with_logits, begin, check_weight_shape, pred_shape, row_weight};
use crate::abi::{FLAG_ACTIVATED, FLAG_ROW_SUM};
use crate::fused::{self, Body, KTarget, Shape, Spec};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{Loss, LossArgs, Target};

const NAME: &str = "QualityFocalLoss";

/// MMDetection's `QualityFocalLoss`: `BCE(x, t) * |t - sigma(x)|^beta`, where `t` is the anchor's
/// quality score at its class and 0 elsewhere, summed over the classes: the loss is per anchor,
/// `(N,)` with `reduction="none"`, and `mean` divides by `N`.
///
/// Targets: `(labels (N,), scores (N,))` (labels outside `0..C` are background, as in
/// MMDetection), or a dense `(N, C)` tensor whose non-zero entries are the positives.
/// Weights broadcast against `(N,)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QualityFocalLoss {
    /// Must be true: MMDetection implements only the sigmoid version.
    pub use_sigmoid: bool,
    /// The exponent of the quality term.
    pub beta: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// `pred` holds probabilities rather than logits.
    pub activated: bool,
}

impl Default for QualityFocalLoss {
    fn default() -> Self {
        Self {
            use_sigmoid: true,
            beta: 2.0,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
            activated: false,
        }
    }
}

impl QualityFocalLoss {
    /// MMDetection's constructor checks.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.use_sigmoid,
            "QualityFocalLoss: only sigmoid in QFL is supported (use_sigmoid must be true)"
        );
        Ok(())
    }
}

impl Loss for QualityFocalLoss {
    fn type_name(&self) -> &str {
        "QualityFocalLoss"
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.validate()?;
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let (n, _) = pred_shape(NAME, pred)?;
        let kt = match target {
            Target::Tensor(t) => KTarget::Dense(t),
            Target::LabelsScores { labels, scores } => KTarget::LabelsScores(labels, scores),
        };
        let weight = args.weight.map(|w| row_weight(NAME, w, n)).transpose()?;
        // Slots: p0 = beta (kernels/quality_focal.cuh).
        let mut spec = Spec::new(
            Body::QualityFocal,
            NAME,
            Shape::Element,
            reduction,
            self.loss_weight,
        );
        spec.params = [self.beta, 0.0, 0.0, 0.0];
        spec.flags = FLAG_ROW_SUM | if self.activated { FLAG_ACTIVATED } else { 0 };
        fused::run(spec, pred, kt, weight.as_ref(), args.avg_factor.as_ref())
    }

    /// `quality_focal_loss`, `quality_focal_loss_with_prob` or `quality_focal_loss_tensor_target`
    /// in stock ops (with MMDetection's indexing of the positives).
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.validate()?;
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let (n, c) = pred_shape(NAME, pred)?;
        if let Some(w) = args.weight {
            check_weight_shape(NAME, w, &[n])?;
        }
        let elem = |p: &Tensor, t: &Tensor| {
            if self.activated {
                bce(NAME, p, t)
            } else {
                bce_with_logits(p, t)
            }
        };
        let sigma = if self.activated {
            pred.shallow_clone()
        } else {
            pred.f_sigmoid()?
        };
        let zeros = sigma.zeros_like();
        let negative = elem(pred, &zeros)? * sigma.f_pow_tensor_scalar(self.beta)?;
        let loss = match target {
            Target::Tensor(t) => {
                ensure!(
                    t.size() == pred.size(),
                    "QualityFocalLoss: target must have pred's shape {:?}, got {:?}",
                    pred.size(),
                    t.size()
                );
                let t = t.f_type_as(pred)?;
                let pos = t.f_ne(0.0)?;
                let scale = t.f_index(&[Some(&pos)])? - sigma.f_index(&[Some(&pos)])?;
                let positive = elem(&pred.f_index(&[Some(&pos)])?, &t.f_index(&[Some(&pos)])?)?
                    * scale.abs().f_pow_tensor_scalar(self.beta)?;
                negative.f_index_put(&[Some(&pos)], &positive, false)?
            }
            Target::LabelsScores { labels, scores } => {
                if labels.dim() != 1
                    || scores.dim() != 1
                    || labels.size()[0] != pred.size()[0]
                    || scores.size()[0] != pred.size()[0]
                {
                    bail!(
                        "QualityFocalLoss: labels and scores must be (N,) for pred of shape {:?}",
                        pred.size()
                    );
                }
                let labels = labels.f_to_kind(Kind::Int64)?;
                let pos = labels
                    .f_ge(0)?
                    .f_logical_and(&labels.f_lt(c)?)?
                    .f_nonzero()?
                    .f_squeeze_dim(1)?;
                let pos_label = labels.f_index(&[Some(&pos)])?;
                let score = scores.f_index(&[Some(&pos)])?.f_type_as(pred)?;
                let scale = &score - sigma.f_index(&[Some(&pos), Some(&pos_label)])?;
                let positive = elem(&pred.f_index(&[Some(&pos), Some(&pos_label)])?, &score)?
                    * scale.abs().f_pow_tensor_scalar(self.beta)?;
                negative.f_index_put(&[Some(&pos), Some(&pos_label)], &positive, false)?
            }
        };
        let loss = loss.f_sum_dim_intlist(1, false, None::<Kind>)?;
        Ok(
            weight_reduce_loss(&loss, args.weight, reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}

const DFL: &str = "DistributionFocalLoss";

/// MMDetection's `DistributionFocalLoss` (GFL's box-side loss): `pred` holds, per box side, the
/// logits of a distribution over the `reg_max + 1` integer distances `0..=reg_max`; the target
/// `y` (a float distance in `[0, reg_max)`) lies between `l = trunc(y)` and `l + 1`, and the loss
/// is `CE(pred, l) (l + 1 - y) + CE(pred, l + 1) (y - l)`, one value per row (`(N,)` with
/// `reduction="none"`; `mean` divides by `N`). Weights broadcast against `(N,)`.
///
/// A target outside `[0, reg_max)` (NaN included) is an error on the CPU and gives a NaN row on
/// CUDA (reporting it there would need a host read). MMDetection also accepts `-1 < y < 0`,
/// where `trunc` gives 0; here that is out of range too.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{losses::DistributionFocalLoss, Loss, LossArgs};
/// let pred = Tensor::randn([8, 17], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let target = Tensor::rand([8], (Kind::Float, Device::Cpu)) * 15.0; // distances in [0, 16)
/// let loss = DistributionFocalLoss::default().forward(&pred, (&target).into(), &LossArgs::new())?;
/// loss.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistributionFocalLoss {
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}

impl Default for DistributionFocalLoss {
    fn default() -> Self {
        Self {
            reduction: Reduction::Mean,
            loss_weight: 1.0,
        }
    }
}

impl DistributionFocalLoss {
    /// MMDetection's constructor checks (there are none).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

impl Loss for DistributionFocalLoss {
    fn type_name(&self) -> &str {
        DFL
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let reduction = begin(DFL, pred, target, args, self.reduction)?;
        let (n, _) = pred_shape(DFL, pred)?;
        let t = super::single_target(DFL, target)?;
        let weight = args.weight.map(|w| row_weight(DFL, w, n)).transpose()?;
        let mut spec = Spec::new(
            Body::DistributionFocal,
            DFL,
            Shape::Row,
            reduction,
            self.loss_weight,
        );
        spec.valid_targets = Some("distances in [0, reg_max)");
        fused::run(
            spec,
            pred,
            KTarget::RowValue(t),
            weight.as_ref(),
            args.avg_factor.as_ref(),
        )
    }

    /// `distribution_focal_loss` in stock ops, with one host read for the range check
    /// (MMDetection's indexing fails there instead).
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        let reduction = begin(DFL, pred, target, args, self.reduction)?;
        let (n, c) = pred_shape(DFL, pred)?;
        let label = super::single_target(DFL, target)?;
        ensure!(
            label.dim() == 1 && label.size()[0] == n,
            "{DFL}: target must be ({n},) for pred of shape {:?}, got {:?}",
            pred.size(),
            label.size()
        );
        if let Some(w) = args.weight {
            check_weight_shape(DFL, w, &[n])?;
        }
        let label = label.f_to_kind(pred.kind())?;
        let reg_max = (c - 1) as f64;
        let in_range = label.f_ge(0.0)?.f_logical_and(&label.f_lt(reg_max)?)?;
        let bad = n - in_range.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        if bad > 0 {
            bail!("{DFL}: {bad} target(s) out of range (valid: distances in [0, reg_max))");
        }
        let dis_left = label.f_to_kind(Kind::Int64)?;
        let dis_right = &dis_left + 1;
        let weight_left = dis_right.f_to_kind(Kind::Float)?.f_sub(&label)?;
        let weight_right = label.f_sub(&dis_left.f_to_kind(Kind::Float)?)?;
        let ce = |t: &Tensor| {
            pred.f_cross_entropy_loss::<Tensor>(t, None, tch::Reduction::None, -100, 0.0)
        };
        let loss = ce(&dis_left)?.f_mul(&weight_left)? + ce(&dis_right)?.f_mul(&weight_right)?;
        Ok(
            weight_reduce_loss(&loss, args.weight, reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}
