//! mmdet/models/losses/seesaw_loss.py: [`SeesawLoss`], the long-tail classification loss of
//! LVIS's Seesaw configs.

use std::sync::Mutex;

use anyhow::{anyhow, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{begin, single_target};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{LossArgs, Target};

const NAME: &str = "SeesawLoss";

/// MMDetection's `SeesawLoss`: a softmax cross-entropy over `num_classes` classes whose logits of
/// the other classes are raised by `log` of the mitigation factor (class `j` against label `i`:
/// `(n_j / n_i)^p` where `n_j < n_i`, from the counts seen so far) and the compensation factor
/// (`(s_j / s_i)^q` where the detached softmax score of `j` beats the label's, `s_i` clamped at
/// `eps`), on the positives; plus a 2-way cross-entropy of the objectness logits over every
/// sample. `pred` is `(N, num_classes + 2)`: the class logits, then the two objectness logits;
/// labels are `(N,)` in `[0, num_classes]`, `num_classes` is background. The weight is the label
/// weight `(N,)`, taken as float32 (MMDetection's `label_weights.float()`).
///
/// The class counts `cum_samples` (float32, `num_classes + 1`, background included) are state:
/// each call adds its labels' counts first, on the device, then computes the loss with them
/// ([`Loss::state`](crate::Loss::state), [`Loss::load_state`](crate::Loss::load_state)).
///
/// [`Loss::forward_parts`](crate::Loss::forward_parts) gives MMDetection's dict, `loss_cls_objectness` and
/// `loss_cls_classes` (with `return_dict`); [`Loss::forward`](crate::Loss::forward) their sum (MMDetection's
/// `return_dict=False`). Without a positive, `loss_cls_classes` is a 0.0 that is not multiplied
/// by `loss_weight`, as in MMDetection.
///
/// Composed of stock ops, with MMDetection's host reads: whether there is a positive, and the
/// gather of the positives (the classes' loss has one row per positive).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, Loss, LossArgs};
/// let loss = registry::build_str(r#"{"type": "SeesawLoss", "num_classes": 4}"#)?;
/// let pred = Tensor::randn([6, 6], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let labels = Tensor::from_slice(&[0i64, 3, 4, 1, 4, 2]); // 4 = background
/// let parts = loss.forward_parts(&pred, (&labels).into(), &LossArgs::new())?;
/// assert_eq!(parts[0].0, "loss_cls_objectness");
/// # anyhow::Ok(())
/// ```
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeesawLoss {
    /// Must be false.
    pub use_sigmoid: bool,
    /// The mitigation exponent (0: none).
    pub p: f64,
    /// The compensation exponent (0: none).
    pub q: f64,
    /// The class count (LVIS's 1203 by default).
    pub num_classes: i64,
    /// The lower clamp of the label's score in the compensation factor.
    pub eps: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies both parts.
    pub loss_weight: f64,
    /// [`Loss::forward_parts`](crate::Loss::forward_parts) gives the two parts (else their sum).
    pub return_dict: bool,
    /// The class counts `cum_samples`, not part of the config.
    #[serde(skip)]
    pub cum_samples: Mutex<Option<Tensor>>,
}

impl Default for SeesawLoss {
    fn default() -> Self {
        Self {
            use_sigmoid: false,
            p: 0.8,
            q: 2.0,
            num_classes: 1203,
            eps: 1e-2,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
            return_dict: true,
            cum_samples: Mutex::new(None),
        }
    }
}

impl Clone for SeesawLoss {
    /// A copy of the config and of the counts.
    fn clone(&self) -> Self {
        let counts = self
            .cum_samples
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(Tensor::copy));
        Self {
            cum_samples: Mutex::new(counts),
            ..*self
        }
    }
}

impl SeesawLoss {
    /// MMDetection's `assert not use_sigmoid`, and a class count of at least 1.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.use_sigmoid, "{NAME}: use_sigmoid must be false");
        ensure!(
            self.num_classes >= 1,
            "{NAME}: num_classes must be at least 1, got {}",
            self.num_classes
        );
        Ok(())
    }

    /// `get_cls_channels(num_classes)`: `num_classes + 2`.
    pub fn get_cls_channels(&self, num_classes: i64) -> Result<i64> {
        ensure!(
            num_classes == self.num_classes,
            "{NAME}: get_cls_channels({num_classes}) of a loss of {} classes",
            self.num_classes
        );
        Ok(num_classes + 2)
    }

    /// `get_activation(cls_score)`: the class softmax times the objectness softmax's first
    /// column, then its second, `(N, num_classes + 1)`.
    pub fn get_activation(&self, cls_score: &Tensor) -> Result<Tensor> {
        self.check_channels(cls_score)?;
        let c = self.num_classes;
        let classes = cls_score.f_narrow(-1, 0, c)?.f_softmax(-1, None::<Kind>)?;
        let obj = cls_score.f_narrow(-1, c, 2)?.f_softmax(-1, None::<Kind>)?;
        let classes = classes.f_mul(&obj.f_narrow(-1, 0, 1)?)?;
        Ok(Tensor::f_cat(&[classes, obj.f_narrow(-1, 1, 1)?], -1)?)
    }

    fn check_channels(&self, pred: &Tensor) -> Result<()> {
        ensure!(
            pred.dim() == 2 && pred.size()[1] == self.num_classes + 2,
            "{NAME}: pred must be (N, num_classes + 2) = (N, {}): the class logits, then 2 objectness logits; got {:?}",
            self.num_classes + 2,
            pred.size()
        );
        Ok(())
    }

    /// Adds the counts of `labels` to `cum_samples` (on their device, float32) and returns it.
    fn count(&self, labels: &Tensor, device: Device) -> Result<Tensor> {
        let mut guard = self
            .cum_samples
            .lock()
            .map_err(|_| anyhow!("{NAME}: the cum_samples lock is poisoned"))?;
        let counts = labels
            .f_one_hot(self.num_classes + 1)
            .map_err(|e| {
                anyhow!(
                    "{NAME}: labels outside [0, {}] ({} is background): {e}",
                    self.num_classes,
                    self.num_classes
                )
            })?
            .f_sum_dim_intlist(0, false, Kind::Float)?;
        let cum = match guard.take() {
            Some(c) => c.f_to_device(device)?,
            None => Tensor::f_zeros([self.num_classes + 1], (Kind::Float, device))?,
        };
        let cum = cum.f_add(&counts)?;
        *guard = Some(cum.shallow_clone());
        Ok(cum)
    }

    /// `seesaw_ce_loss` of the positives.
    fn classes_loss(
        &self,
        cls: &Tensor,
        labels: &Tensor,
        label_weights: &Tensor,
        cum: &Tensor,
        reduction: Reduction,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        let c = self.num_classes;
        let onehot = labels.f_one_hot(c)?;
        let mut weights = cls.f_ones_like()?;
        if self.p > 0.0 {
            let cum = cum.f_narrow(0, 0, c)?;
            let ratio = cum
                .f_unsqueeze(0)?
                .f_clamp_min(1.0)?
                .f_div(&cum.f_unsqueeze(1)?.f_clamp_min(1.0)?)?;
            let index = ratio.f_lt(1.0)?.f_to_kind(Kind::Float)?;
            let sample = ratio
                .f_pow_tensor_scalar(self.p)?
                .f_mul(&index)?
                .f_add(&index.f_neg()?.f_add_scalar(1.0)?)?;
            weights = weights.f_mul(&sample.f_index_select(0, labels)?)?;
        }
        if self.q > 0.0 {
            let scores = cls.f_detach()?.f_softmax(1, None::<Kind>)?;
            let own = scores.f_gather(1, &labels.f_unsqueeze(1)?, false)?;
            let matrix = scores.f_div(&own.f_clamp_min(self.eps)?)?;
            let index = matrix.f_gt(1.0)?.f_to_kind(Kind::Float)?;
            let comp = matrix
                .f_pow_tensor_scalar(self.q)?
                .f_mul(&index)?
                .f_add(&index.f_neg()?.f_add_scalar(1.0)?)?;
            weights = weights.f_mul(&comp)?;
        }
        let logits = cls.f_add(&weights.f_log()?.f_mul(&onehot.f_neg()?.f_add_scalar(1)?)?)?;
        let loss =
            logits.f_cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::None, -100, 0.0)?;
        weight_reduce_loss(
            &loss,
            Some(label_weights),
            reduction,
            args.avg_factor.as_ref(),
        )
    }

    /// The two parts, `(loss_cls_objectness, loss_cls_classes)`.
    fn parts(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<(Tensor, Tensor)> {
        self.validate()?;
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let labels = single_target(NAME, target)?;
        crate::checks::integer(NAME, "target", labels)?;
        self.check_channels(pred)?;
        let n = pred.size()[0];
        ensure!(
            labels.size() == [n],
            "{NAME}: labels (target) must be ({n},), got {:?}",
            labels.size()
        );
        let labels = labels.f_to_kind(Kind::Int64)?;
        let cum = self.count(&labels, pred.device())?;
        let c = self.num_classes;
        let label_weights = match args.weight {
            Some(w) => {
                ensure!(
                    w.size() == [n],
                    "{NAME}: weight (label_weights) must be ({n},), got {:?}",
                    w.size()
                );
                w.f_to_kind(Kind::Float)?
            }
            None => Tensor::f_ones([n], (Kind::Float, labels.device()))?,
        };
        let cls = pred.f_narrow(1, 0, c)?;
        let obj = pred.f_narrow(1, c, 2)?;
        let pos = labels.f_lt(c)?;
        let has_positive = pos.f_any()?.f_int64_value(&[])? != 0;
        let classes = if has_positive {
            let idx = pos.f_nonzero()?.f_squeeze_dim(1)?;
            self.classes_loss(
                &cls.f_index_select(0, &idx)?,
                &labels.f_index_select(0, &idx)?,
                &label_weights.f_index_select(0, &idx)?,
                &cum,
                reduction,
                args,
            )?
            .f_mul_scalar(self.loss_weight)?
        } else {
            cls.f_index_select(0, &pos.f_nonzero()?.f_squeeze_dim(1)?)?
                .f_sum(cls.kind())?
        };
        let obj_labels = labels.f_eq(c)?.f_to_kind(Kind::Int64)?;
        let obj_loss =
            obj.f_cross_entropy_loss::<Tensor>(&obj_labels, None, tch::Reduction::None, -100, 0.0)?;
        let objectness = weight_reduce_loss(
            &obj_loss,
            Some(&label_weights),
            reduction,
            args.avg_factor.as_ref(),
        )?
        .f_mul_scalar(self.loss_weight)?;
        Ok((objectness, classes))
    }
}

impl SeesawLoss {
    /// The loss in stock ops.
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let (objectness, classes) = self.parts(pred, target, args)?;
        classes.f_add(&objectness).map_err(|e| {
            anyhow!("{NAME}: the classes' and the objectness losses do not broadcast ('none' without return_dict needs one positive or all): {e}")
        })
    }
}

super::composed_loss!(SeesawLoss, NAME, {
    fn forward_parts(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Vec<(String, Tensor)>> {
        if !self.return_dict {
            return Ok(vec![("loss".into(), self.forward(pred, target, args)?)]);
        }
        let (objectness, classes) = self.parts(pred, target, args)?;
        Ok(vec![
            ("loss_cls_objectness".into(), objectness),
            ("loss_cls_classes".into(), classes),
        ])
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let guard = self
            .cum_samples
            .lock()
            .map_err(|_| anyhow!("{NAME}: the cum_samples lock is poisoned"))?;
        let t = match guard.as_ref() {
            Some(t) => t.f_detach_copy()?,
            None => Tensor::f_zeros([self.num_classes + 1], (Kind::Float, Device::Cpu))?,
        };
        Ok(vec![("cum_samples".into(), t)])
    }

    fn load_state(&self, name: &str, value: &Tensor) -> Result<()> {
        ensure!(
            name == "cum_samples",
            "{NAME}: no state named {name:?} (it has cum_samples)"
        );
        ensure!(
            value.size() == [self.num_classes + 1],
            "{NAME}: cum_samples must be ({},), got {:?}",
            self.num_classes + 1,
            value.size()
        );
        let v = value
            .f_to_kind(Kind::Float)
            .context("cum_samples")?
            .f_detach_copy()?;
        *self
            .cum_samples
            .lock()
            .map_err(|_| anyhow!("{NAME}: the cum_samples lock is poisoned"))? = Some(v);
        Ok(())
    }

    fn get_activation(&self, cls_score: &Tensor) -> Result<Option<Tensor>> {
        Self::get_activation(self, cls_score).map(Some)
    }
});
