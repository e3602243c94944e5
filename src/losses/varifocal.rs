//! `VarifocalLoss` (mmdet/models/losses/varifocal_loss.py): the varifocal loss of VarifocalNet.
//! Kernel body: `kernels/varifocal.cuh`.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{bce_with_logits, begin, check_weight_shape, pred_shape, single_target};
use crate::abi::FLAG_IOU_WEIGHTED;
use crate::fused::{self, Body, KTarget, Shape, Spec};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{Loss, LossArgs, Target};

const NAME: &str = "VarifocalLoss";

/// MMDetection's `VarifocalLoss`: `BCE(x, t) * w`, with `w = t` (or 1 without `iou_weighted`)
/// where `t > 0` and `alpha |sigma(x) - t|^gamma` elsewhere.
///
/// Target: a dense `(N, C)` IoU-aware target. Weights broadcast against `(N, C)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VarifocalLoss {
    /// Must be true: MMDetection supports only the sigmoid version.
    pub use_sigmoid: bool,
    /// The weight of negatives; must be >= 0.
    pub alpha: f64,
    /// The focusing exponent of negatives.
    pub gamma: f64,
    /// Weight positives by their target (IoU) rather than by 1.
    pub iou_weighted: bool,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}

impl Default for VarifocalLoss {
    fn default() -> Self {
        Self {
            use_sigmoid: true,
            alpha: 0.75,
            gamma: 2.0,
            iou_weighted: true,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
        }
    }
}

impl VarifocalLoss {
    /// MMDetection's constructor checks.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.use_sigmoid,
            "VarifocalLoss: only sigmoid varifocal loss is supported (use_sigmoid must be true)"
        );
        ensure!(
            self.alpha >= 0.0,
            "VarifocalLoss: alpha must be >= 0, got {}",
            self.alpha
        );
        Ok(())
    }

    fn check(pred: &Tensor, t: &Tensor, weight: Option<&Tensor>) -> Result<()> {
        pred_shape("VarifocalLoss", pred)?;
        ensure!(
            t.size() == pred.size(),
            "VarifocalLoss: target must have pred's shape {:?}, got {:?}",
            pred.size(),
            t.size()
        );
        if let Some(w) = weight {
            check_weight_shape("VarifocalLoss", w, &pred.size())?;
        }
        Ok(())
    }
}

impl Loss for VarifocalLoss {
    fn type_name(&self) -> &str {
        "VarifocalLoss"
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.validate()?;
        let reduction = begin("VarifocalLoss", pred, target, args, self.reduction)?;
        let t = single_target("VarifocalLoss", target)?;
        Self::check(pred, t, args.weight)?;
        // Slots: p0 = gamma, p1 = alpha (kernels/varifocal.cuh).
        let mut spec = Spec::new(
            Body::Varifocal,
            NAME,
            Shape::Element,
            reduction,
            self.loss_weight,
        );
        spec.params = [self.gamma, self.alpha, 0.0, 0.0];
        spec.flags = if self.iou_weighted {
            FLAG_IOU_WEIGHTED
        } else {
            0
        };
        fused::run(
            spec,
            pred,
            KTarget::Dense(t),
            args.weight,
            args.avg_factor.as_ref(),
        )
    }

    /// `varifocal_loss` in stock ops.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.validate()?;
        let reduction = begin("VarifocalLoss", pred, target, args, self.reduction)?;
        let t = single_target("VarifocalLoss", target)?;
        Self::check(pred, t, args.weight)?;
        let sigma = pred.f_sigmoid()?;
        let t = t.f_type_as(pred)?;
        let pos = t.f_gt(0.0)?.f_type_as(pred)?;
        let neg = t.f_le(0.0)?.f_type_as(pred)?;
        let pos_w = if self.iou_weighted { &t * &pos } else { pos };
        let focal_weight =
            pos_w + (&sigma - &t).abs().f_pow_tensor_scalar(self.gamma)? * self.alpha * neg;
        let loss = bce_with_logits(pred, &t)? * focal_weight;
        Ok(
            weight_reduce_loss(&loss, args.weight, reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}
