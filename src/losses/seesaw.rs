//! mmdet/models/losses/seesaw_loss.py: [`SeesawLoss`], the long-tail classification loss of
//! LVIS's Seesaw configs.

use std::sync::Mutex;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{begin, row_weight, single_target};
use crate::abi::FLAG_PLAIN_MEAN;
use crate::fused::{self, Body, KTarget, Shape, Spec};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{Loss, LossArgs, Target};

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
/// ([`Loss::state`], [`Loss::load_state`]).
///
/// [`Loss::forward_parts`] gives MMDetection's dict, `loss_cls_objectness` and
/// `loss_cls_classes` (with `return_dict`); [`Loss::forward`] their sum (MMDetection's
/// `return_dict=False`). Without a positive, `loss_cls_classes` is a 0.0 that is not multiplied
/// by `loss_weight`, as in MMDetection.
///
/// Fused: each part is one scan-row kernel over the whole rows (kernels/seesaw.cuh), with no copy
/// of its columns; the classes' leaves the background rows out (a zero that is not multiplied by
/// `loss_weight` is still 0), so 'mean' and 'sum' read nothing back. 'none' gathers the
/// positives' losses (a host read, as in MMDetection). [`Loss::forward_unfused`] is the stock-op composition with MMDetection's host
/// reads (whether there is a positive, the gather of the positives). A label outside
/// `[0, num_classes]` is an error on the CPU and gives NaN on a device.
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
    /// [`Loss::forward_parts`] gives the two parts (else their sum).
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
    /// A label outside `[0, num_classes]` is an error on the CPU; on a device it adds nothing
    /// here (no host read) and makes the loss NaN.
    fn count(&self, labels: &Tensor, device: Device) -> Result<Tensor> {
        let mut guard = self
            .cum_samples
            .lock()
            .map_err(|_| anyhow!("{NAME}: the cum_samples lock is poisoned"))?;
        let c = self.num_classes;
        let valid = labels.f_ge(0)?.f_logical_and(&labels.f_le(c)?)?;
        if labels.device() == Device::Cpu && !bool::try_from(valid.f_all()?)? {
            let bad = labels.numel() as i64 - valid.f_sum(Kind::Int64)?.f_int64_value(&[])?;
            bail!("{NAME}: {bad} label(s) outside [0, {c}] ({c} is background)");
        }
        let counts = Tensor::f_zeros([c + 1], (Kind::Float, labels.device()))?.f_scatter_add(
            0,
            &labels.f_clamp(0, c)?,
            &valid.f_to_kind(Kind::Float)?,
        )?;
        let cum = match guard.take() {
            Some(c) => c.f_to_device(device)?,
            None => Tensor::f_zeros([c + 1], (Kind::Float, device))?,
        };
        let cum = cum.f_add(&counts)?;
        *guard = Some(cum.shallow_clone());
        Ok(cum)
    }

    /// MMDetection's `[C, C]` float32 mitigation matrix from the class counts (row `i`: label
    /// `i`), in its ops; None for `p = 0`.
    fn mitigation(&self, cum: &Tensor) -> Result<Option<Tensor>> {
        if self.p <= 0.0 {
            return Ok(None);
        }
        let cum = cum.f_narrow(0, 0, self.num_classes)?;
        let ratio = cum
            .f_unsqueeze(0)?
            .f_clamp_min(1.0)?
            .f_div(&cum.f_unsqueeze(1)?.f_clamp_min(1.0)?)?;
        let index = ratio.f_lt(1.0)?.f_to_kind(Kind::Float)?;
        Ok(Some(
            ratio
                .f_pow_tensor_scalar(self.p)?
                .f_mul(&index)?
                .f_add(&index.f_neg()?.f_add_scalar(1.0)?)?,
        ))
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
        if let Some(sample) = self.mitigation(cum)? {
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

    /// The checks both paths share, and the class counts with this call's labels added:
    /// `(reduction, labels, label_weights, cum_samples)`.
    fn begin_call(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<(Reduction, Tensor, Tensor, Tensor)> {
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
        Ok((reduction, labels, label_weights, cum))
    }

    /// The two parts, `(loss_cls_objectness, loss_cls_classes)`, from the fused kernels: one
    /// scan-row kernel (kernels/seesaw.cuh) per part over the whole rows, the classes' leaving
    /// the background rows out (so that 'mean' and 'sum' read nothing back).
    fn parts(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let (reduction, labels, label_weights, cum) = self.begin_call(pred, target, args)?;
        let (n, c) = (pred.size()[0], self.num_classes);
        let weight = row_weight(NAME, &label_weights, n)?;
        let avg_factor = args.avg_factor.as_ref();
        let part = |i0: i64, class_param: Option<Tensor>| {
            let mut spec = Spec::new(Body::Seesaw, NAME, Shape::Row, reduction, self.loss_weight);
            // Slots: i0 = the part, p1 = q, p2 = eps, aux = the mitigation matrix and its log.
            spec.int_param = i0;
            spec.params = [0.0, self.q, self.eps, 0.0];
            spec.class_param_len = Some(2 * c * c);
            spec.class_param = class_param;
            spec.valid_targets =
                Some("class indices in [0, num_classes], num_classes is background");
            spec
        };
        // The log as MMDetection takes it, in the kind of its seesaw weights (pred's, at least
        // float32).
        let acc = if pred.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let mitigation = match self.mitigation(&cum)? {
            Some(m) => {
                let m = m.f_to_kind(acc)?;
                let log = m.f_log()?;
                Some(Tensor::f_cat(&[m, log], 0)?)
            }
            None => None,
        };
        let mut classes = part(0, mitigation);
        // MMDetection's mean over the positives it gathers: their count, without eps.
        classes.count_valid = true;
        classes.flags = FLAG_PLAIN_MEAN;
        let rows = fused::run(
            classes,
            pred,
            KTarget::Labels(&labels),
            Some(&weight),
            avg_factor,
        )?;
        let classes = if reduction == Reduction::None {
            // One loss per positive (a host read, as MMDetection's gather); without one, their
            // sum, 0.
            let idx = labels.f_lt(c)?.f_nonzero()?.f_squeeze_dim(1)?;
            let pos = rows.f_index_select(0, &idx)?;
            if idx.numel() == 0 {
                pos.f_sum(pos.kind())?
            } else {
                pos
            }
        } else {
            rows
        };
        let objectness = fused::run(
            part(1, None),
            pred,
            KTarget::Labels(&labels),
            Some(&weight),
            avg_factor,
        )?;
        Ok((objectness, classes))
    }

    /// The two parts in stock ops, with MMDetection's host reads: whether there is a positive,
    /// and the gather of the positives.
    fn parts_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let (reduction, labels, label_weights, cum) = self.begin_call(pred, target, args)?;
        let c = self.num_classes;
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

/// `return_dict=False`: the sum of the two parts.
fn sum_parts((objectness, classes): (Tensor, Tensor)) -> Result<Tensor> {
    classes.f_add(&objectness).map_err(|e| {
        anyhow!("{NAME}: the classes' and the objectness losses do not broadcast ('none' without return_dict needs one positive or all): {e}")
    })
}

impl Loss for SeesawLoss {
    fn type_name(&self) -> &str {
        NAME
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        sum_parts(self.parts(pred, target, args)?)
    }

    /// The stock-op composition.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        sum_parts(self.parts_unfused(pred, target, args)?)
    }

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
}
