//! mmdet/models/losses/eqlv2_loss.py: [`EQLV2Loss`], Equalization Loss v2 for long-tail
//! classification (LVIS).

use std::sync::Mutex;

use anyhow::{anyhow, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::single_target;
use crate::{LossArgs, Target};

const NAME: &str = "EQLV2Loss";

/// MMDetection's `EQLV2Loss`: `loss_weight * sum(BCE(x, onehot(label)) * w) / N` with per-class
/// weights from the gradient statistics gathered so far, `neg_w = sigmoid(gamma (pos_neg - mu))`
/// (1 for the last, objectness, column) and `pos_w = 1 + alpha (1 - neg_w)`;
/// `w = pos_w t + neg_w (1 - t)`. pred is `(N, num_classes + 1)`, labels `(N,)` in
/// `[0, num_classes]`.
///
/// As in MMDetection 3.3, the statistics are gathered in the forward pass, after the loss, from
/// `|sigmoid(x) - t|` of this call (no backward hook): `pos_grad`, `neg_grad` and
/// `pos_neg = pos_grad / (neg_grad + 1e-10)`, float32 `(num_classes,)` buffers kept on the device
/// ([`Loss::state`](crate::Loss::state), [`Loss::load_state`](crate::Loss::load_state)), with `use_distributed` summed over the default
/// process group ([`crate::dist`]) first. The call's `weight`, `avg_factor` and reduction are
/// ignored, as are `class_weight`, `reduction` and `vis_grad` of the config: MMDetection ignores
/// them.
///
/// Composed of stock ops.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, Loss, LossArgs};
/// let loss = registry::build_str(r#"{"type": "EQLV2Loss", "num_classes": 3}"#)?;
/// let pred = Tensor::randn([5, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let labels = Tensor::from_slice(&[0i64, 2, 3, 1, 3]);
/// loss.forward(&pred, (&labels).into(), &LossArgs::new())?.backward();
/// assert_eq!(loss.state()?.len(), 3); // pos_grad, neg_grad, pos_neg
/// # anyhow::Ok(())
/// ```
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EQLV2Loss {
    /// Forced to true, as in MMDetection.
    pub use_sigmoid: bool,
    /// Ignored, as in MMDetection.
    pub reduction: crate::Reduction,
    /// Ignored, as in MMDetection.
    pub class_weight: Option<Value>,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// The class count (without the objectness column).
    pub num_classes: i64,
    /// Sum the statistics over the default process group.
    pub use_distributed: bool,
    /// The centre of the weight map.
    pub mu: f64,
    /// The positives' extra weight.
    pub alpha: f64,
    /// The slope of the weight map.
    pub gamma: f64,
    /// Unused, as in MMDetection.
    pub vis_grad: bool,
    /// [`Loss::get_activation`](crate::Loss::get_activation) scales the classes by one minus the objectness score.
    pub test_with_obj: bool,
    /// `pos_grad`, `neg_grad`, `pos_neg`; not part of the config.
    #[serde(skip)]
    pub stats: Mutex<Option<[Tensor; 3]>>,
}

impl Default for EQLV2Loss {
    fn default() -> Self {
        Self {
            use_sigmoid: true,
            reduction: crate::Reduction::Mean,
            class_weight: None,
            loss_weight: 1.0,
            num_classes: 1203,
            use_distributed: false,
            mu: 0.8,
            alpha: 4.0,
            gamma: 12.0,
            vis_grad: false,
            test_with_obj: true,
            stats: Mutex::new(None),
        }
    }
}

impl Clone for EQLV2Loss {
    /// A copy of the config and of the statistics.
    fn clone(&self) -> Self {
        let stats = self
            .stats
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|s| s.each_ref().map(Tensor::copy)));
        Self {
            class_weight: self.class_weight.clone(),
            stats: Mutex::new(stats),
            ..*self
        }
    }
}

const STATE: [&str; 3] = ["pos_grad", "neg_grad", "pos_neg"];

impl EQLV2Loss {
    /// A class count of at least 1.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.num_classes >= 1,
            "{NAME}: num_classes must be at least 1, got {}",
            self.num_classes
        );
        Ok(())
    }

    /// `get_channel_num(num_classes)`: `num_classes + 1`.
    pub fn get_channel_num(&self, num_classes: i64) -> i64 {
        num_classes + 1
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<[Tensor; 3]>>> {
        self.stats
            .lock()
            .map_err(|_| anyhow!("{NAME}: the statistics' lock is poisoned"))
    }

    /// The statistics on `device`: zeros, zeros and 100 before the first call.
    fn stats_on(&self, device: Device) -> Result<[Tensor; 3]> {
        let guard = self.lock()?;
        let c = self.num_classes;
        Ok(match guard.as_ref() {
            Some(s) => [
                s[0].f_to_device(device)?,
                s[1].f_to_device(device)?,
                s[2].f_to_device(device)?,
            ],
            None => [
                Tensor::f_zeros([c], (Kind::Float, device))?,
                Tensor::f_zeros([c], (Kind::Float, device))?,
                Tensor::f_full([c], 100.0, (Kind::Float, device))?,
            ],
        })
    }

    /// `get_weight`: `(pos_w, neg_w)` rows of `n_c` entries in pred's kind, float32 values.
    fn weights(
        &self,
        pos_neg: &Tensor,
        pred: &Tensor,
        n_i: i64,
        n_c: i64,
    ) -> Result<(Tensor, Tensor)> {
        let map = pos_neg
            .f_sub_scalar(self.mu)?
            .f_mul_scalar(-self.gamma)?
            .f_exp()?
            .f_add_scalar(1.0)?
            .f_reciprocal()?;
        let neg_w = Tensor::f_cat(
            &[map, pred.f_new_ones([1], (pred.kind(), pred.device()))?],
            0,
        )?;
        let pos_w = neg_w
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_mul_scalar(self.alpha)?
            .f_add_scalar(1.0)?;
        let expand = |w: &Tensor| -> Result<Tensor> {
            w.f_view([1, -1])?.f_expand([n_i, n_c], false).map_err(|e| {
                anyhow!(
                    "{NAME}: pred must have num_classes + 1 = {} columns: {e}",
                    self.num_classes + 1
                )
            })
        };
        Ok((expand(&pos_w)?, expand(&neg_w)?))
    }

    /// `get_activation(pred)`: `sigmoid(pred)`, with `test_with_obj` the classes scaled by
    /// `1 - sigmoid(pred[:, -1])`.
    fn activation(&self, pred: &Tensor) -> Result<Tensor> {
        ensure!(
            pred.dim() == 2 && pred.size()[1] >= 1,
            "{NAME}: get_activation takes (N, C) scores, got {:?}",
            pred.size()
        );
        let p = pred.f_sigmoid()?;
        if !self.test_with_obj {
            return Ok(p);
        }
        let c = p.size()[1];
        let bg = p.f_narrow(1, c - 1, 1)?;
        let classes = p
            .f_narrow(1, 0, c - 1)?
            .f_mul(&bg.f_neg()?.f_add_scalar(1.0)?)?;
        Ok(Tensor::f_cat(&[classes, bg], 1)?)
    }
}

impl EQLV2Loss {
    /// The loss in stock ops, then the statistics' update.
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.validate()?;
        crate::checks::floating(NAME, "pred", pred)?;
        // Ignored, but a tensor that cannot be read is still an error.
        if let Some(w) = args.weight {
            crate::checks::real(NAME, "weight", w)?;
        }
        if let Some(crate::AvgFactor::Tensor(t)) = &args.avg_factor {
            crate::checks::readable(NAME, "avg_factor", t)?;
        }
        let label = single_target(NAME, target)?;
        crate::checks::integer(NAME, "target", label)?;
        ensure!(
            pred.dim() == 2,
            "{NAME}: pred must be (N, num_classes + 1), got {:?}",
            pred.size()
        );
        let (n_i, n_c) = (pred.size()[0], pred.size()[1]);
        ensure!(
            label.size() == [n_i],
            "{NAME}: labels (target) must be ({n_i},), got {:?}",
            label.size()
        );
        let target = label
            .f_to_kind(Kind::Int64)?
            .f_one_hot(n_c)
            .map_err(|e| anyhow!("{NAME}: labels outside [0, {n_c}): {e}"))?
            .f_to_kind(pred.kind())?;
        let [pos_grad, neg_grad, pos_neg] = self.stats_on(pred.device())?;
        let (pos_w, neg_w) = self.weights(&pos_neg, pred, n_i, n_c)?;
        let weight = pos_w
            .f_mul(&target)?
            .f_add(&neg_w.f_mul(&target.f_neg()?.f_add_scalar(1.0)?)?)?;
        let bce = super::bce_with_logits(pred, &target)?;
        let loss = bce
            .f_mul(&weight)?
            .f_sum(pred.kind())?
            .f_div_scalar(n_i as f64)?;

        // collect_grad, on the detached inputs.
        let (x, t, w) = (pred.f_detach()?, target.f_detach()?, weight.f_detach()?);
        let prob = x.f_sigmoid()?;
        let not_t = t.f_neg()?.f_add_scalar(1.0)?;
        let grad = t
            .f_mul(&prob.f_sub_scalar(1.0)?)?
            .f_add(&not_t.f_mul(&prob)?)?
            .f_abs()?;
        let column_sums = |m: &Tensor| -> Result<Tensor> {
            Ok(grad
                .f_mul(m)?
                .f_mul(&w)?
                .f_sum_dim_intlist(0, false, None::<Kind>)?
                .f_narrow(0, 0, n_c - 1)?)
        };
        let (pos, neg) = (column_sums(&t)?, column_sums(&not_t)?);
        if self.use_distributed {
            let group = crate::dist::default_group().ok_or_else(|| {
                anyhow!("{NAME}: Default process group has not been initialized, please make sure to call init_process_group.")
            })?;
            for s in [&pos, &neg] {
                group
                    .all_reduce(s, crate::dist::ReduceOp::Sum)
                    .and_then(|w| w.wait(None))
                    .with_context(|| format!("{NAME}: all_reduce of the gradient statistics"))?;
            }
        }
        let (mut pos_grad, mut neg_grad) = (pos_grad, neg_grad);
        let _ = pos_grad.f_add_(&pos)?;
        let _ = neg_grad.f_add_(&neg)?;
        let pos_neg = pos_grad.f_div(&neg_grad.f_add_scalar(1e-10)?)?;
        *self.lock()? = Some([pos_grad, neg_grad, pos_neg]);
        Ok(loss.f_mul_scalar(self.loss_weight)?)
    }
}

super::composed_loss!(EQLV2Loss, NAME, {
    fn get_activation(&self, cls_score: &Tensor) -> Result<Option<Tensor>> {
        self.activation(cls_score).map(Some)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let s = self.stats_on(Device::Cpu)?;
        Ok(STATE
            .iter()
            .zip(s)
            .map(|(k, t)| (k.to_string(), t.copy()))
            .collect())
    }

    fn load_state(&self, name: &str, value: &Tensor) -> Result<()> {
        let i = STATE.iter().position(|k| *k == name).ok_or_else(|| {
            anyhow!("{NAME}: no state named {name:?} (it has pos_grad, neg_grad, pos_neg)")
        })?;
        ensure!(
            value.size() == [self.num_classes],
            "{NAME}: {name} must be ({},), got {:?}",
            self.num_classes,
            value.size()
        );
        let device = value.device();
        let mut s = self.stats_on(device)?;
        s[i] = value.f_to_kind(Kind::Float)?.f_detach_copy()?;
        *self.lock()? = Some(s);
        Ok(())
    }
});
