//! mmdet/models/losses/gaussian_focal_loss.py: [`GaussianFocalLoss`] (kernel body
//! `kernels/gaussian_focal.cuh`), CenterNet's and CornerNet's heatmap loss.

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{begin, element_view, run_element_view, single_target};
use crate::fused::{Body, Shape, Spec};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{Loss, LossArgs, Target};

pub(crate) const NAME: &str = "GaussianFocalLoss";
const EPS: f64 = 1e-12;

/// MMDetection's `GaussianFocalLoss`: the focal loss of probabilities `pred` against a gaussian
/// heatmap `target` of pred's shape (any rank: CenterNet's `(B, C, H, W)`),
/// `pos_weight * -log(p + eps) (1 - p)^alpha [t == 1] + neg_weight * -log(1 - p + eps) p^alpha
/// (1 - t)^gamma`, `eps = 1e-12`; positives are exactly `t == 1`. 'none' gives pred's shape; the
/// weight broadcasts against it.
///
/// With [`LossArgs::positives`] (`pos_inds`, `pos_labels`: MMDetection's
/// `gaussian_focal_loss_with_pos_inds`, pred `(N, C)`), the positive term is taken at
/// `pred[pos_inds, pos_labels]` only (`(M, 1)`), the negative term over every element, each
/// reduced on its own with the same reduction and `avg_factor`, and the weight is ignored, as in
/// MMDetection ('none' then needs `M` equal to 1 or `N`, as torch's broadcast does).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "GaussianFocalLoss", "loss_weight": 1.0}"#)?;
/// let heatmap_pred = Tensor::rand([2, 3, 8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let heatmap = Tensor::rand([2, 3, 8, 8], (Kind::Float, Device::Cpu));
/// loss.forward(&heatmap_pred, (&heatmap).into(), &LossArgs::new().avg_factor(4.0))?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GaussianFocalLoss {
    /// The exponent of `1 - p` (positives) and of `p` (negatives).
    pub alpha: f64,
    /// The exponent of `1 - t` in the negatives' weight.
    pub gamma: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// Multiplies the positive term.
    pub pos_weight: f64,
    /// Multiplies the negative term.
    pub neg_weight: f64,
}

impl Default for GaussianFocalLoss {
    fn default() -> Self {
        Self {
            alpha: 2.0,
            gamma: 4.0,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
            pos_weight: 1.0,
            neg_weight: 1.0,
        }
    }
}

impl GaussianFocalLoss {
    /// MMDetection's constructor checks (there are none).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }

    fn spec(&self, reduction: Reduction, pos_weight: f64, loss_weight: f64) -> Spec {
        let mut spec = Spec::new(
            Body::GaussianFocal,
            NAME,
            Shape::Element,
            reduction,
            loss_weight,
        );
        spec.params = [self.alpha, self.gamma, pos_weight, self.neg_weight];
        spec
    }

    /// The positives of the `pos_inds` form, `pred[pos_inds].gather(1, pos_labels[:, None])`,
    /// `(M, 1)`, after MMDetection's `assert pos_labels is not None`.
    fn positives(pred: &Tensor, args: &LossArgs<'_>) -> Result<Option<Tensor>> {
        let Some(inds) = args.pos_inds else {
            return Ok(None);
        };
        let labels = args
            .pos_labels
            .ok_or_else(|| anyhow!("{NAME}: pos_inds needs pos_labels (MMDetection asserts it)"))?;
        crate::checks::integer(NAME, "pos_inds", inds)?;
        crate::checks::integer(NAME, "pos_labels", labels)?;
        ensure!(
            pred.dim() == 2 && inds.dim() == 1 && labels.size() == inds.size(),
            "{NAME}: the pos_inds form takes pred (N, C) and pos_inds, pos_labels (M,), got {:?}, \
             {:?} and {:?}",
            pred.size(),
            inds.size(),
            labels.size()
        );
        let rows = pred
            .f_index_select(0, &inds.f_to_kind(Kind::Int64)?)
            .with_context(|| format!("{NAME}: pos_inds outside [0, {})", pred.size()[0]))?;
        let at = rows
            .f_gather(1, &labels.f_to_kind(Kind::Int64)?.f_unsqueeze(1)?, false)
            .with_context(|| format!("{NAME}: pos_labels outside [0, {})", pred.size()[1]))?;
        Ok(Some(at))
    }

    /// `-(p + eps).log() * (1 - p).pow(alpha)` of the positives, reduced as MMDetection's
    /// `weight_reduce_loss(pos_loss, None, reduction, avg_factor)`.
    fn positive_term(
        &self,
        at: &Tensor,
        reduction: Reduction,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        let loss = at.f_add_scalar(EPS)?.f_log()?.f_neg()?.f_mul(
            &at.f_neg()?
                .f_add_scalar(1.0)?
                .f_pow_tensor_scalar(self.alpha)?,
        )?;
        weight_reduce_loss(&loss, None, reduction, args.avg_factor.as_ref())
    }

    /// `pos_weight * pos + neg_weight * neg` of the pos_inds form, times `loss_weight`.
    fn combine(&self, pos: Tensor, neg: Tensor) -> Result<Tensor> {
        let sum = pos
            .f_mul_scalar(self.pos_weight)?
            .f_add(&neg)
            .map_err(|e| anyhow!("{NAME}: the positive and the negative terms do not broadcast ('none' needs one positive or one per row): {e}"))?;
        Ok(sum.f_mul_scalar(self.loss_weight)?)
    }

    /// `-(1 - pred + eps).log() * pred.pow(alpha) * (1 - target).pow(gamma)`, the negative term
    /// of both forms, unweighted.
    fn negative_term(&self, pred: &Tensor, t: &Tensor) -> Result<Tensor> {
        let neg_w = t
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_pow_tensor_scalar(self.gamma)?;
        Ok(pred
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_add_scalar(EPS)?
            .f_log()?
            .f_neg()?
            .f_mul(&pred.f_pow_tensor_scalar(self.alpha)?)?
            .f_mul(&neg_w)?)
    }

    /// The stock-op loss of the dense form, `gaussian_focal_loss`'s element loss.
    fn element_unfused(&self, pred: &Tensor, t: &Tensor, pos_weight: f64) -> Result<Tensor> {
        let pos_w = t.f_eq(1.0)?;
        let pos = pred
            .f_add_scalar(EPS)?
            .f_log()?
            .f_neg()?
            .f_mul(
                &pred
                    .f_neg()?
                    .f_add_scalar(1.0)?
                    .f_pow_tensor_scalar(self.alpha)?,
            )?
            .f_mul(&pos_w)?;
        let neg = self.negative_term(pred, t)?;
        Ok(pos
            .f_mul_scalar(pos_weight)?
            .f_add(&neg.f_mul_scalar(self.neg_weight)?)?)
    }
}

impl Loss for GaussianFocalLoss {
    fn type_name(&self) -> &str {
        NAME
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let t = single_target(NAME, target)?;
        if let Some(at) = Self::positives(pred, args)? {
            ensure!(
                t.size() == pred.size(),
                "{NAME}: target must have pred's shape {:?}, got {:?}",
                pred.size(),
                t.size()
            );
            let pos = self.positive_term(&at, reduction, args)?;
            // The negative term alone (pos_weight 0) on the element kernel, unweighted.
            let neg_args = LossArgs {
                weight: None,
                pos_inds: None,
                pos_labels: None,
                ..args.clone()
            };
            // An empty pred has no kernel view: the stock composition serves.
            let Some(view) = element_view(pred, t, None) else {
                return self.forward_unfused(pred, target, args);
            };
            let neg = run_element_view(self.spec(reduction, 0.0, 1.0), view, pred, t, &neg_args)?;
            return self.combine(pos, neg);
        }
        if args.pos_labels.is_some() {
            bail!("{NAME}: pos_labels without pos_inds");
        }
        super::check_broadcasts(NAME, pred, t, args.weight)?;
        let Some(view) = element_view(pred, t, args.weight) else {
            return self.forward_unfused(pred, target, args);
        };
        run_element_view(
            self.spec(reduction, self.pos_weight, self.loss_weight),
            view,
            pred,
            t,
            args,
        )
    }

    /// `gaussian_focal_loss` (or `gaussian_focal_loss_with_pos_inds`) in stock ops.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let t = single_target(NAME, target)?;
        if let Some(at) = Self::positives(pred, args)? {
            let t = t.f_type_as(pred)?;
            let pos = self.positive_term(&at, reduction, args)?;
            let neg = self.negative_term(pred, &t).map_err(|e| {
                anyhow!(
                    "{NAME}: target of shape {:?} for pred of shape {:?}: {e}",
                    t.size(),
                    pred.size()
                )
            })?;
            let neg = weight_reduce_loss(&neg, None, reduction, args.avg_factor.as_ref())?
                .f_mul_scalar(self.neg_weight)?;
            return self.combine(pos, neg);
        }
        if args.pos_labels.is_some() {
            bail!("{NAME}: pos_labels without pos_inds");
        }
        super::check_broadcasts(NAME, pred, t, args.weight)?;
        let loss = self.element_unfused(pred, &t.f_type_as(pred)?, self.pos_weight)?;
        Ok(
            weight_reduce_loss(&loss, args.weight, reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}
