//! mmdet/models/losses/l2_loss.py and margin_loss.py: [`L2Loss`] and [`MarginL2Loss`], the
//! embedding-match losses of QDTrack, with the `update_weight` they share.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{begin, single_target};
use crate::reduction::{weight_reduce_loss, AvgFactor, Reduction};
use crate::{LossArgs, Target};

/// The constructor arguments L2Loss and MarginL2Loss share.
macro_rules! l2_config {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $ty {
            /// At most this many negatives per positive (the hardest with `hard_mining`); -1:
            /// no bound.
            pub neg_pos_ub: i64,
            /// Subtracted from pred at the positives (when > 0).
            pub pos_margin: f64,
            /// Subtracted from pred at the negatives (when > 0).
            pub neg_margin: f64,
            /// Keep the negatives of largest loss under `neg_pos_ub` (else random ones).
            pub hard_mining: bool,
            /// The default reduction ('sum' always fails, as in MMDetection).
            pub reduction: Reduction,
            /// Multiplies the result.
            pub loss_weight: f64,
        }

        impl Default for $ty {
            fn default() -> Self {
                Self {
                    neg_pos_ub: -1,
                    pos_margin: -1.0,
                    neg_margin: -1.0,
                    hard_mining: false,
                    reduction: Reduction::Mean,
                    loss_weight: 1.0,
                }
            }
        }

        impl $ty {
            /// MMDetection's constructor checks (there are none).
            pub fn validate(&self) -> Result<()> {
                Ok(())
            }

            fn update(&self, name: &'static str, margin: bool) -> Update {
                Update {
                    name,
                    margin,
                    loss_weight: self.loss_weight,
                    reduction: self.reduction,
                    neg_pos_ub: self.neg_pos_ub,
                    pos_margin: self.pos_margin,
                    neg_margin: self.neg_margin,
                    hard_mining: self.hard_mining,
                }
            }
        }
    };
}

l2_config!(
    /// MMDetection's `L2Loss`: `|pred - target|^2` after `update_weight`, which, as in
    /// MMDetection, **writes into the caller's tensors**: `target` gets -1 where the weight is
    /// <= 0, and pred (which must not be a leaf that requires grad when a margin is set) loses
    /// the margins in place. pred is then clamped to `[0, 1]`; positives are `target == 1`,
    /// negatives `target == 0`; with `neg_pos_ub` the surplus negatives get weight 0 (written
    /// into the caller's weight). The call's `avg_factor` is replaced by the count of weights > 0,
    /// so 'mean' divides by it and 'sum' always raises, as in MMDetection. The random choice of
    /// negatives without `hard_mining` uses libtorch's generator (MMDetection's numpy one cannot
    /// be reproduced).
    ///
    /// Composed of stock ops, with host reads (the counts and the mining).
    ///
    /// ```
    /// use tch::{Device, Kind, Tensor};
    /// use tch_detloss::{registry, LossArgs};
    /// let loss = registry::build_str(r#"{"type": "L2Loss", "neg_pos_ub": 3, "hard_mining": true}"#)?;
    /// let sim = Tensor::rand([4, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    /// let target = Tensor::rand([4, 8], (Kind::Float, Device::Cpu)).gt(0.8).to_kind(Kind::Float);
    /// loss.forward(&sim, (&target).into(), &LossArgs::new())?.backward();
    /// # anyhow::Ok(())
    /// ```
    L2Loss
);

l2_config!(
    /// MMDetection's `MarginL2Loss`: L2Loss's `update_weight`, then
    /// `mse_loss(pred, target.float(), weight.float())` (so a float64 pred's loss uses float32
    /// target and weight values; MMDetection's own backward raises there, "Found dtype Float but
    /// expected Double"; this one computes the same loss in pred's kind and has a backward).
    ///
    /// Composed of stock ops, with host reads (the counts and the mining).
    ///
    /// ```
    /// use tch::{Device, Kind, Tensor};
    /// use tch_detloss::{registry, LossArgs};
    /// let loss = registry::build_str(r#"{"type": "MarginL2Loss"}"#)?;
    /// let sim = Tensor::rand([4, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    /// let target = Tensor::rand([4, 8], (Kind::Float, Device::Cpu)).gt(0.8).to_kind(Kind::Float);
    /// loss.forward(&sim, (&target).into(), &LossArgs::new())?.backward();
    /// # anyhow::Ok(())
    /// ```
    MarginL2Loss
);

/// `update_weight`'s options, and the loss's: its name, MarginL2Loss's `mse_loss` on float32
/// values (else L2Loss's `|pred - target|^2`), `loss_weight` and the configured reduction.
struct Update {
    name: &'static str,
    margin: bool,
    loss_weight: f64,
    reduction: Reduction,
    neg_pos_ub: i64,
    pos_margin: f64,
    neg_margin: f64,
    hard_mining: bool,
}

impl Update {
    /// `update_weight(pred, target, weight, avg_factor)`: the clamped pred, the weight and the
    /// count of weights > 0; `cost` is the element loss hard mining ranks the negatives by.
    fn run(
        &self,
        name: &str,
        pred: &Tensor,
        target: &Tensor,
        weight: Option<&Tensor>,
        cost: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        ensure!(
            pred.size() == target.size(),
            "{name}: pred and target must have one shape, got {:?} and {:?}",
            pred.size(),
            target.size()
        );
        // MMDetection indexes target with `weight <= 0` (and writes the weight in place): the
        // weight must have target's shape.
        let mut weight = match weight {
            Some(w) => {
                ensure!(
                    w.size() == target.size(),
                    "{name}: weight must have target's shape {:?}, got {:?}",
                    target.size(),
                    w.size()
                );
                w.shallow_clone()
            }
            None => target.f_ones_like()?,
        };
        let mut target = target.shallow_clone();
        let invalid = weight.f_le(0)?;
        // Written only where there is something to write, so that a call leaves the caller's
        // target (which an earlier call's graph may hold) untouched otherwise.
        if invalid.f_any()?.f_int64_value(&[])? != 0 {
            let _ = target.f_masked_fill_(&invalid, -1)?;
        }
        let pos = target.f_eq(1)?;
        let neg = target.f_eq(0)?;
        let mut pred = pred.shallow_clone();
        // `pred[mask] -= margin`, as MMDetection's index puts (in place, on the caller's pred).
        for (margin, mask) in [(self.pos_margin, &pos), (self.neg_margin, &neg)] {
            if margin > 0.0 {
                let values = pred.f_index(&[Some(mask)])?.f_sub_scalar(margin)?;
                let _ = pred
                    .f_index_put_(&[Some(mask)], &values, false)
                    .map_err(|e| {
                        anyhow::anyhow!("{name}: pred (a margin is subtracted in place): {e}")
                    })?;
            }
        }
        let pred = pred.f_clamp(0.0, 1.0)?;
        let num_pos = pos.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        let num_neg = neg.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        if self.neg_pos_ub > 0 && num_neg as f64 / (num_pos as f64 + 1e-6) > self.neg_pos_ub as f64
        {
            ensure!(
                pred.dim() == 2,
                "{name}: neg_pos_ub needs (N, C) inputs, got {:?}",
                pred.size()
            );
            let keep = num_pos * self.neg_pos_ub;
            let neg_idx = neg.f_nonzero()?;
            let (rows, cols) = (neg_idx.f_select(1, 0)?, neg_idx.f_select(1, 1)?);
            let chosen = if self.hard_mining {
                let costs = cost(&pred, &target)?
                    .f_index(&[Some(&rows), Some(&cols)])?
                    .f_detach()?;
                costs.f_topk(keep, 0, true, true)?.1
            } else {
                Tensor::f_randperm(neg_idx.size()[0], (Kind::Int64, pred.device()))?
                    .f_narrow(0, 0, keep)?
            };
            let chosen = neg_idx.f_index_select(0, &chosen)?;
            let mut new_neg = neg.f_zeros_like()?;
            let _ = new_neg.f_index_put_(
                &[Some(chosen.f_select(1, 0)?), Some(chosen.f_select(1, 1)?)],
                &Tensor::f_from_slice(&[true])?.f_to_device(pred.device())?,
                false,
            )?;
            let dropped = neg.f_logical_xor(&new_neg)?;
            let _ = weight.f_masked_fill_(&dropped, 0)?;
        }
        let avg_factor = weight.f_gt(0)?.f_sum(Kind::Int64)?;
        Ok((pred, weight, avg_factor))
    }
}

/// `|pred - target|^2`.
fn l2(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok(pred.f_sub(target)?.f_abs()?.f_pow_tensor_scalar(2)?)
}

/// `F.mse_loss(pred, target.float(), reduction='none')`: the target's float32 values, in pred's
/// kind (so that a float64 pred has a backward, which MMDetection's mixed-dtype `mse_loss` lacks).
fn mse_float(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let t = target.f_to_kind(Kind::Float)?.f_to_kind(pred.kind())?;
    Ok(pred.f_mse_loss(&t, tch::Reduction::None)?)
}

fn l2_family(u: &Update, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
    let (name, margin, loss_weight, configured) = (u.name, u.margin, u.loss_weight, u.reduction);
    // The call's avg_factor is replaced (but a tensor that cannot be read is still an error).
    if let Some(AvgFactor::Tensor(t)) = &args.avg_factor {
        crate::checks::readable(name, "avg_factor", t)?;
    }
    let reduction = begin(
        name,
        pred,
        target,
        &LossArgs {
            avg_factor: None,
            ..args.clone()
        },
        configured,
    )?;
    let t = single_target(name, target)?;
    ensure!(
        t.kind() != Kind::Bool,
        "{name}: target must be numeric (1 positive, 0 negative), got Bool"
    );
    let elem = if margin { mse_float } else { l2 };
    let (p, w, n) = u.run(name, pred, t, args.weight, elem)?;
    if reduction == Reduction::Sum {
        // avg_factor is always set by update_weight.
        bail!("{name}: avg_factor can not be used with reduction=\"sum\" (update_weight always sets it)");
    }
    let avg = AvgFactor::Tensor(n);
    // The loss saves its own copies: the caller's tensors are written by later calls.
    let (loss, weight) = if margin {
        (
            mse_float(&p, &t.f_detach_copy()?)?,
            w.f_to_kind(Kind::Float)?.f_detach_copy()?,
        )
    } else {
        (l2(&p, t)?, w.f_detach_copy()?)
    };
    Ok(weight_reduce_loss(&loss, Some(&weight), reduction, Some(&avg))? * loss_weight)
}

impl L2Loss {
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        l2_family(&self.update("L2Loss", false), pred, target, args)
    }
}

impl MarginL2Loss {
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        l2_family(&self.update("MarginL2Loss", true), pred, target, args)
    }
}

super::composed_loss!(L2Loss, "L2Loss");
super::composed_loss!(MarginL2Loss, "MarginL2Loss");
