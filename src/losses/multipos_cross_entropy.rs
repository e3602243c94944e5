//! mmdet/models/losses/multipos_cross_entropy_loss.py: [`MultiPosCrossEntropyLoss`], QDTrack's
//! contrastive loss over several positives per row.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{begin, single_target};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{LossArgs, Target};

const NAME: &str = "MultiPosCrossEntropyLoss";

/// MMDetection's `MultiPosCrossEntropyLoss`: per row,
/// `log(1 + sum over positives p and negatives n of exp(x_n - x_p))`, where the label (of pred's
/// shape) marks positives `>= 1` and negatives `== 0` (other values are neither). 'none' gives
/// `(N,)`; the weight is per row, taken as float32.
///
/// Composed of stock ops (the pairs are an `(N, C^2)` expansion, as in MMDetection).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "MultiPosCrossEntropyLoss"}"#)?;
/// let sim = Tensor::randn([4, 6], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let label = Tensor::rand([4, 6], (Kind::Float, Device::Cpu)).gt(0.7).to_kind(Kind::Float);
/// loss.forward(&sim, (&label).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MultiPosCrossEntropyLoss {
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}

impl Default for MultiPosCrossEntropyLoss {
    fn default() -> Self {
        Self {
            reduction: Reduction::Mean,
            loss_weight: 1.0,
        }
    }
}

impl MultiPosCrossEntropyLoss {
    /// MMDetection's constructor checks (there are none).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

impl MultiPosCrossEntropyLoss {
    /// `multi_pos_cross_entropy` in stock ops.
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let label = single_target(NAME, target)?;
        ensure!(
            pred.dim() == 2 && label.size() == pred.size(),
            "{NAME}: pred and label (target) must be (N, C) of one shape, got {:?} and {:?}",
            pred.size(),
            label.size()
        );
        let c = pred.size()[1];
        let pos = label.f_ge(1)?;
        let neg = label.f_eq(0)?;
        let pred_pos = pred.f_mul(&pos.f_to_kind(Kind::Float)?)?;
        let pred_neg = pred.f_mul(&neg.f_to_kind(Kind::Float)?)?;
        // pred_pos[neg] += inf, pred_neg[pos] += -inf, as MMDetection's index puts.
        let pred_pos = pred_pos
            .f_add_scalar(f64::INFINITY)?
            .f_where_self(&neg, &pred_pos)?;
        let pred_neg = pred_neg
            .f_add_scalar(f64::NEG_INFINITY)?
            .f_where_self(&pos, &pred_neg)?;
        let pos_expand = pred_pos.f_repeat_interleave_self_int(c, Some(1), None)?;
        let neg_expand = pred_neg.f_repeat([1, c])?;
        let x = neg_expand.f_sub(&pos_expand)?.f_constant_pad_nd([0, 1])?;
        let loss = x.f_logsumexp([1], false)?;
        let weight = args.weight.map(|w| w.f_to_kind(Kind::Float)).transpose()?;
        if let Some(w) = &weight {
            super::check_weight_shape(NAME, w, &loss.size())?;
        }
        Ok(
            weight_reduce_loss(&loss, weight.as_ref(), reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}

super::composed_loss!(MultiPosCrossEntropyLoss, NAME);
