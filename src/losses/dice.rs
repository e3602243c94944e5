//! mmdet/models/losses/dice_loss.py: [`DiceLoss`], the mask loss of Mask2Former, SOLO and
//! their kin.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{begin, single_target};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{LossArgs, Target};

const NAME: &str = "DiceLoss";

/// MMDetection's `DiceLoss`: `1 - d` per sample over pred and target flattened from dimension 1,
/// V-Net's `d = 2 sum(x t) / ((sum x^2 + eps) + (sum t^2 + eps))` or, with `naive_dice`,
/// `(2 sum(x t) + eps) / (sum x + sum t + eps)`; `x` is `sigmoid(pred)` with `activate` (the
/// default), pred itself without. The target may be float, integer or bool and is taken as
/// float32 (`target.float()`, so a float64 soft target is rounded, as in MMDetection). 'none'
/// gives `(N,)`; the weight is `(N,)` (MMDetection asserts it).
///
/// MMDetection's call is `forward(pred, target, weight, reduction_override, avg_factor)`: the
/// fourth positional argument is the reduction; [`LossArgs`] names each.
///
/// Composed of stock ops: each sample's sums run over a whole flattened mask.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "DiceLoss", "naive_dice": true, "eps": 1.0}"#)?;
/// let masks = Tensor::randn([4, 28, 28], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let gt = Tensor::rand([4, 28, 28], (Kind::Float, Device::Cpu)).gt(0.5);
/// loss.forward(&masks, (&gt).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiceLoss {
    /// With `activate`, the sigmoid (false: the softmax, which MMDetection does not implement).
    pub use_sigmoid: bool,
    /// Apply the activation to pred.
    pub activate: bool,
    /// The default reduction.
    pub reduction: Reduction,
    /// The naive dice (first powers in the denominator) instead of V-Net's.
    pub naive_dice: bool,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// Smooths the ratio (added twice to V-Net's denominator).
    pub eps: f64,
}

impl Default for DiceLoss {
    fn default() -> Self {
        Self {
            use_sigmoid: true,
            activate: true,
            reduction: Reduction::Mean,
            naive_dice: false,
            loss_weight: 1.0,
            eps: 1e-3,
        }
    }
}

impl DiceLoss {
    /// MMDetection's constructor checks (there are none; the softmax fails at the call).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

impl DiceLoss {
    /// `dice_loss` in stock ops.
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let t = single_target(NAME, target)?;
        if self.activate && !self.use_sigmoid {
            bail!("{NAME}: activate=true with use_sigmoid=false (a softmax) is not implemented in MMDetection");
        }
        ensure!(
            pred.dim() >= 1 && t.dim() >= 1 && t.size()[0] == pred.size()[0],
            "{NAME}: pred and target must have one sample per row, got shapes {:?} and {:?}",
            pred.size(),
            t.size()
        );
        let x = if self.activate {
            pred.f_sigmoid()?
        } else {
            pred.shallow_clone()
        };
        let input = x.f_flatten(1, -1)?;
        let target = t.f_flatten(1, -1)?.f_to_kind(Kind::Float)?;
        ensure!(
            input.size() == target.size(),
            "{NAME}: pred of shape {:?} and target of shape {:?} differ per sample",
            pred.size(),
            t.size()
        );
        let sum = |t: &Tensor| t.f_sum_dim_intlist(1, false, None::<Kind>);
        let a = sum(&input.f_mul(&target)?)?;
        let eps = self.eps;
        let d = if self.naive_dice {
            let (b, c) = (sum(&input)?, sum(&target)?);
            a.f_mul_scalar(2.0)?
                .f_add_scalar(eps)?
                .f_div(&b.f_add(&c)?.f_add_scalar(eps)?)?
        } else {
            let b = sum(&input.f_mul(&input)?)?.f_add_scalar(eps)?;
            let c = sum(&target.f_mul(&target)?)?.f_add_scalar(eps)?;
            a.f_mul_scalar(2.0)?.f_div(&b.f_add(&c)?)?
        };
        let loss = d.f_neg()?.f_add_scalar(1.0)?;
        if let Some(w) = args.weight {
            ensure!(
                w.dim() == 1 && w.size()[0] == pred.size()[0],
                "{NAME}: weight must be (N,) for N = {} samples, got shape {:?}",
                pred.size()[0],
                w.size()
            );
        }
        Ok(
            weight_reduce_loss(&loss, args.weight, reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}

super::composed_loss!(DiceLoss, NAME);
