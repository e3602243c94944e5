//! mmdet/models/losses/triplet_loss.py: [`TripletLoss`], the re-identification loss of the
//! tracking heads.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::single_target;
use crate::{LossArgs, Target};

const NAME: &str = "TripletLoss";

/// MMDetection's `TripletLoss` with hard mining: over the Euclidean distances of the embeddings
/// `(N, D)` (clamped at 1e-12 before the square root), each sample's farthest positive (same
/// target id, itself included) and nearest negative, and
/// `loss_weight * mean(max(0, d_ap - d_an + margin))` (`MarginRankingLoss`). Targets are ids
/// `(N,)`. The call takes no weight, `avg_factor` or reduction (MMDetection's takes none); a
/// sample without a negative is an error, as MMDetection's `min()` of nothing.
/// `hard_mining: false` is not implemented in MMDetection, nor here.
///
/// Composed of stock ops.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "TripletLoss", "margin": 0.3}"#)?;
/// let emb = Tensor::randn([6, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let ids = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2]);
/// loss.forward(&emb, (&ids).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TripletLoss {
    /// The ranking margin.
    pub margin: f64,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// Must be true to call the loss (MMDetection raises NotImplementedError otherwise).
    pub hard_mining: bool,
}

impl Default for TripletLoss {
    fn default() -> Self {
        Self {
            margin: 0.3,
            loss_weight: 1.0,
            hard_mining: true,
        }
    }
}

impl TripletLoss {
    /// MMDetection's constructor checks (there are none).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

impl TripletLoss {
    /// `hard_mining_triplet_loss_forward` in stock ops, the per-sample
    /// loop as masked reductions: `amax` and `amin` share the gradient among ties, as the
    /// loop's `max()` and `min()` do.
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        crate::checks::floating(NAME, "pred", pred)?;
        let ids = single_target(NAME, target)?;
        crate::checks::integer(NAME, "target", ids)?;
        super::takes_no_call_args(NAME, args, "forward(inputs, targets)")?;
        if !self.hard_mining {
            bail!(
                "{NAME}: hard_mining=false is not implemented in MMDetection (NotImplementedError)"
            );
        }
        ensure!(
            pred.dim() == 2,
            "{NAME}: pred must be embeddings (N, D), got shape {:?}",
            pred.size()
        );
        ensure!(
            ids.size() == [pred.size()[0]],
            "{NAME}: target must be ids ({},), got shape {:?}",
            pred.size()[0],
            ids.size()
        );
        let n = pred.size()[0];
        let sq = pred
            .f_pow_tensor_scalar(2)?
            .f_sum_dim_intlist(1, true, None::<Kind>)?
            .f_expand([n, n], false)?;
        let dist = sq
            .f_add(&sq.f_transpose(0, 1)?)?
            .f_sub(&pred.f_matmul(&pred.f_transpose(0, 1)?)?.f_mul_scalar(2.0)?)?
            .f_clamp_min(1e-12)?
            .f_sqrt()?;
        let ids = ids.f_expand([n, n], false)?;
        let same = ids.f_eq_tensor(&ids.f_transpose(0, 1)?)?;
        let has_negative = same
            .f_logical_not()?
            .f_any_dim(1, false)?
            .f_all()?
            .f_int64_value(&[])?
            != 0;
        if !has_negative {
            bail!(
                "{NAME}: a sample has no negative (MMDetection: min(): Expected reduction dim to be specified for input.numel() == 0. Specify the reduction dim with the 'dim' argument.)"
            );
        }
        let d_ap = dist
            .f_masked_fill(&same.f_logical_not()?, f64::NEG_INFINITY)?
            .f_amax([1], false)?;
        let d_an = dist
            .f_masked_fill(&same, f64::INFINITY)?
            .f_amin([1], false)?;
        let y = d_an.f_ones_like()?;
        let loss =
            Tensor::f_margin_ranking_loss(&d_an, &d_ap, &y, self.margin, tch::Reduction::Mean)?;
        Ok(loss.f_mul_scalar(self.loss_weight)?)
    }
}

super::composed_loss!(TripletLoss, NAME);
