//! `QualityFocalLoss` (mmdet/models/losses/gfocal_loss.py): the quality focal loss of GFL.
//! Kernel body: `kernels/quality_focal.cuh`.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{bce, bce_with_logits, begin, check_weight_shape, pred_shape};
use crate::fused::{self, Body, KTarget, Spec};
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

    /// A weight broadcast against the per-anchor loss (N,), as a column for the kernels.
    fn weight_column(w: &Tensor, n: i64) -> Result<Tensor> {
        check_weight_shape(NAME, w, &[n])?;
        Ok(w.f_expand([n], false)?.f_unsqueeze(1)?)
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
        let weight = args.weight.map(|w| Self::weight_column(w, n)).transpose()?;
        let spec = Spec {
            body: Body::QualityFocal,
            name: "QualityFocalLoss",
            p0: self.beta,
            p1: 0.0,
            activated: self.activated,
            iou_weighted: false,
            row_sum: true,
            strict_labels: false,
            loss_weight: self.loss_weight,
            reduction,
        };
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
