//! `CrossEntropyLoss` (mmdet/models/losses/cross_entropy_loss.py): softmax cross-entropy on the
//! row executor and its `use_sigmoid` form (BCE) on the element executor, one kernel body
//! (`kernels/cross_entropy.cuh`).

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{begin, check_weight_shape, pred_shape, row_weight, single_target};
use crate::abi::FLAG_SIGMOID;
use crate::checks::broadcast_shapes;
use crate::fused::{self, Body, KTarget, Shape, Spec};
use crate::reduction::{weight_reduce_loss, AvgFactor, Reduction};
use crate::{Loss, LossArgs, Target};

pub(crate) const NAME: &str = "CrossEntropyLoss";
/// What the names of the classes that take a call-time `ignore_index` begin with.
pub(crate) const NAME_STEM: &str = "CrossEntropy";

/// MMDetection's `CrossEntropyLoss`.
///
/// Softmax (`use_sigmoid: false`): `pred` `(N, C)` logits and class-index labels `(N,)`; the loss
/// of a row is `class_weight[y] * (logsumexp(pred_i) - pred_i[y])`, 0 where `y == ignore_index`,
/// `(N,)` with `reduction="none"`. 'mean' divides by `N` (not by the summed class weights), or
/// by the count of non-ignored labels with `avg_non_ignore`, a count the forward pass makes on
/// the device. Sample weights broadcast against `(N,)` and are rounded to float32, as
/// MMDetection's `weight.float()` does. A label outside `[0, C)` other than `ignore_index` is an
/// error on the CPU and gives a NaN row on CUDA (reporting it there would need a host read).
///
/// Sigmoid (`use_sigmoid: true`): BCE-with-logits with `pos_weight = class_weight`, on class-index
/// labels `(N,)` (expanded to one-hot on the fly; a label `>= C` is an all-negative row, a
/// negative label or `ignore_index` a row of weight 0) or on a target of pred's shape (an element
/// that is negative or equals `ignore_index` gets weight 0), including the `(N,)` pred with `(N,)`
/// target form of ATSS's centerness. Its result has pred's shape with `reduction="none"`.
///
/// `use_mask` (`mask_cross_entropy`, the mask head's loss) is not supported: building one with
/// it is an error.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "CrossEntropyLoss", "ignore_index": 255, "avg_non_ignore": true}"#)?;
/// let pred = Tensor::randn([6, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let labels = Tensor::from_slice(&[0i64, 3, 255, 1, 2, 255]);
/// let l = loss.forward(&pred, (&labels).into(), &LossArgs::new())?; // mean over the 4 labelled rows
/// l.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossEntropyLoss {
    /// BCE-with-logits per class instead of a softmax over the classes.
    pub use_sigmoid: bool,
    /// `mask_cross_entropy`: not supported.
    pub use_mask: bool,
    /// The default reduction.
    pub reduction: Reduction,
    /// A weight per class (softmax: `F.cross_entropy`'s `weight`; sigmoid: `pos_weight`).
    pub class_weight: Option<Vec<f64>>,
    /// The label to ignore; `None` means -100. A call's [`LossArgs::ignore_index`] overrides it.
    pub ignore_index: Option<i64>,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// 'mean' without `avg_factor` averages over the non-ignored labels only.
    pub avg_non_ignore: bool,
    /// `class_weight` on the device of the last call (not part of the config).
    #[serde(skip)]
    pub class_weight_copy: super::DeviceCopy,
}

impl Default for CrossEntropyLoss {
    fn default() -> Self {
        Self {
            use_sigmoid: false,
            use_mask: false,
            reduction: Reduction::Mean,
            class_weight: None,
            ignore_index: None,
            loss_weight: 1.0,
            avg_non_ignore: false,
            class_weight_copy: super::DeviceCopy::default(),
        }
    }
}

impl CrossEntropyLoss {
    /// MMDetection's constructor checks, and the one option not supported here.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !(self.use_sigmoid && self.use_mask),
            "{NAME}: use_sigmoid and use_mask cannot both be true"
        );
        ensure!(
            !self.use_mask,
            "{NAME}: use_mask=true (mask_cross_entropy, the mask head's loss) is not supported"
        );
        Ok(())
    }

    fn ignore_index(&self, args: &LossArgs<'_>) -> i64 {
        args.ignore_index.or(self.ignore_index).unwrap_or(-100)
    }

    /// `class_weight` as MMDetection's `cls_score.new_tensor(...)`: in pred's kind, on its device
    /// (copied there on the first call only).
    fn class_weight(&self, pred: &Tensor) -> Result<Option<Tensor>> {
        self.class_weight
            .as_ref()
            .map(|cw| self.class_weight_copy.get(cw, pred.kind(), pred.device()))
            .transpose()
    }
}

/// The sigmoid form's validity mask `(t >= 0) & (t != ignore_index)` as a float tensor.
fn valid_mask(t: &Tensor, ignore: i64) -> Result<Tensor> {
    Ok(t.f_ge(0)?
        .f_logical_and(&t.f_ne(ignore)?)?
        .f_to_kind(Kind::Float)?)
}

impl Loss for CrossEntropyLoss {
    fn type_name(&self) -> &str {
        NAME
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.forward_named(NAME, pred, target, args)
    }

    /// `cross_entropy` or `binary_cross_entropy` in stock ops, with MMDetection's host reads
    /// (`avg_non_ignore`'s count, `nonzero` in the one-hot expansion).
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.forward_unfused_named(NAME, pred, target, args)
    }
}

impl CrossEntropyLoss {
    /// [`Loss::forward`] with errors that name the class `name` (a class built on this one).
    pub(crate) fn forward_named(
        &self,
        name: &'static str,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.validate()?;
        let reduction = begin(name, pred, target, args, self.reduction)?;
        let t = single_target(name, target)?;
        let ignore = self.ignore_index(args);
        let mut spec = Spec::new(
            Body::CrossEntropy,
            name,
            Shape::Row,
            reduction,
            self.loss_weight,
        );
        // Slots: aux = class_weight, i0 = ignore_index (kernels/cross_entropy.cuh).
        spec.int_param = ignore;
        spec.class_param = self.class_weight(pred)?;
        spec.count_valid = self.avg_non_ignore;
        let avg_factor = args.avg_factor.as_ref();
        // MMDetection's `weight.float()`.
        let weight = args.weight.map(|w| w.f_to_kind(Kind::Float)).transpose()?;

        if !self.use_sigmoid {
            let (n, _) = pred_shape(name, pred)?;
            spec.valid_targets = Some("class indices in [0, C), or ignore_index");
            let weight = weight.map(|w| row_weight(name, &w, n)).transpose()?;
            return fused::run(spec, pred, KTarget::Labels(t), weight.as_ref(), avg_factor);
        }

        spec.shape = Shape::Element;
        spec.flags = FLAG_SIGMOID;
        if pred.dim() != t.dim() {
            // Class indices, expanded to one-hot rows by the kernels.
            let (n, c) = pred_shape(name, pred)?;
            spec.class_param = pos_weight(spec.class_param, c)?;
            // `label_weights.view(-1, 1).repeat(1, C)`.
            let weight = weight
                .map(|w| -> Result<Tensor> {
                    let w = w.f_reshape([-1, 1])?;
                    broadcast_shapes(&[n, c], &[w.size()[0], c])?;
                    Ok(w)
                })
                .transpose()?;
            return fused::run(spec, pred, KTarget::Labels(t), weight.as_ref(), avg_factor);
        }
        // A target of pred's shape; `(N,)` pred and target run as `(N, 1)`.
        let column = pred.dim() == 1;
        let (pred2, t2) = if column {
            (pred.f_unsqueeze(1)?, t.f_unsqueeze(1)?)
        } else {
            (pred.shallow_clone(), t.shallow_clone())
        };
        let (_, c) = pred_shape(name, &pred2)?;
        spec.class_param = pos_weight(spec.class_param, c)?;
        let weight = weight
            .map(|w| -> Result<Tensor> {
                // `weight * valid_mask`, then `loss * weight`.
                broadcast_shapes(&w.size(), &t.size())?;
                check_weight_shape(name, &w, &pred.size())?;
                Ok(if column {
                    w.f_expand(pred.size(), false)?.f_unsqueeze(1)?
                } else {
                    w
                })
            })
            .transpose()?;
        // MMDetection's `label.float()`.
        let t2 = t2.f_to_kind(Kind::Float)?;
        let out = fused::run(
            spec,
            &pred2,
            KTarget::Dense(&t2),
            weight.as_ref(),
            avg_factor,
        )?;
        Ok(if column && out.dim() == 2 {
            out.f_squeeze_dim(1)?
        } else {
            out
        })
    }

    /// `cross_entropy` or `binary_cross_entropy` in stock ops, with MMDetection's host reads
    /// (`avg_non_ignore`'s count, `nonzero` in the one-hot expansion).
    pub(crate) fn forward_unfused_named(
        &self,
        name: &'static str,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.validate()?;
        let reduction = begin(name, pred, target, args, self.reduction)?;
        let label = single_target(name, target)?;
        let ignore = self.ignore_index(args);
        let class_weight = self.class_weight(pred)?;
        let mut avg_factor = args.avg_factor.clone();
        let count = avg_factor.is_none() && self.avg_non_ignore && reduction == Reduction::Mean;

        if !self.use_sigmoid {
            let (n, _) = pred_shape(name, pred)?;
            crate::checks::integer(name, "target", label)?;
            ensure!(
                label.dim() == 1 && label.size()[0] == n,
                "{name}: class-index target must be ({n},) for pred of shape {:?}, got {:?}",
                pred.size(),
                label.size()
            );
            let label = &label.f_to_kind(Kind::Int64)?;
            let loss = pred.f_cross_entropy_loss(
                label,
                class_weight.as_ref(),
                tch::Reduction::None,
                ignore,
                0.0,
            )
            .map_err(|e| {
                anyhow::anyhow!("{name}: class-index target outside [0, {}) and not the ignore_index {ignore}: {e}", pred.size()[1])
            })?;
            if count {
                let ignored = label.f_eq(ignore)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
                avg_factor = Some(AvgFactor::Value((label.numel() as i64 - ignored) as f64));
            }
            let weight = args.weight.map(|w| w.f_to_kind(Kind::Float)).transpose()?;
            if let Some(w) = &weight {
                check_weight_shape(name, w, &loss.size())?;
            }
            return Ok(
                weight_reduce_loss(&loss, weight.as_ref(), reduction, avg_factor.as_ref())?
                    * self.loss_weight,
            );
        }

        let (label, weight, valid_mask) = if pred.dim() != label.dim() {
            // `_expand_onehot_labels`.
            crate::checks::integer(name, "target", label)?;
            let (n, c) = pred_shape(name, pred)?;
            ensure!(
                label.dim() == 1 && label.size()[0] == n,
                "{name}: class-index target must be ({n},), got {:?}",
                label.size()
            );
            let labels = label.f_to_kind(Kind::Int64)?;
            let valid = labels.f_ge(0)?.f_logical_and(&labels.f_ne(ignore)?)?;
            let bin_labels =
                super::one_hot_where(&labels, c, &valid.f_logical_and(&labels.f_lt(c)?)?)?;
            let valid_mask = valid
                .f_view([-1, 1])?
                .f_expand([n, c], false)?
                .f_to_kind(Kind::Float)?;
            let weight = match args.weight {
                None => valid_mask.shallow_clone(),
                Some(w) => w.f_view([-1, 1])?.f_repeat([1, c])? * &valid_mask,
            };
            (bin_labels, weight, valid_mask)
        } else {
            let valid_mask = valid_mask(label, ignore)?;
            let weight = match args.weight {
                None => valid_mask.shallow_clone(),
                Some(w) => w.f_mul(&valid_mask)?,
            };
            (label.shallow_clone(), weight, valid_mask)
        };
        if count {
            avg_factor = Some(AvgFactor::Value(
                valid_mask.f_sum(Kind::Double)?.f_double_value(&[])?,
            ));
        }
        let weight = weight.f_to_kind(Kind::Float)?;
        let loss = pred.f_binary_cross_entropy_with_logits(
            &label.f_to_kind(Kind::Float)?,
            None::<Tensor>,
            class_weight,
            tch::Reduction::None,
        )?;
        check_weight_shape(name, &weight, &loss.size())?;
        Ok(
            weight_reduce_loss(&loss, Some(&weight), reduction, avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}

/// `pos_weight` for `C` classes: one value per class, or one for all.
fn pos_weight(cw: Option<Tensor>, c: i64) -> Result<Option<Tensor>> {
    match cw {
        Some(cw) if cw.numel() == 1 => Ok(Some(cw.f_expand([c], false)?)),
        Some(cw) if cw.numel() as i64 != c => {
            bail!(
                "{NAME}: class_weight has {} values for {c} classes",
                cw.numel()
            )
        }
        other => Ok(other),
    }
}

/// MMDetection's `CrossEntropyCustomLoss` (V3Det): [`CrossEntropyLoss`] with a required
/// `num_classes` and the classifier helpers of a custom-channel loss (`get_cls_channels`,
/// `get_activation`); its loss is CrossEntropyLoss's, rule for rule.
///
/// ```
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "CrossEntropyCustomLoss", "num_classes": 3}"#)?;
/// let pred = tch::Tensor::randn([4, 4], (tch::Kind::Float, tch::Device::Cpu));
/// let labels = tch::Tensor::from_slice(&[0i64, 2, 3, 1]);
/// let l = loss.forward(&pred, (&labels).into(), &LossArgs::new())?;
/// # anyhow::Ok(())
/// ```
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossEntropyCustomLoss {
    /// BCE-with-logits per class instead of a softmax over the classes.
    pub use_sigmoid: bool,
    /// `mask_cross_entropy`: not supported.
    pub use_mask: bool,
    /// The default reduction.
    pub reduction: Reduction,
    /// The class count; required (MMDetection asserts it is not -1).
    pub num_classes: i64,
    /// A weight per class.
    pub class_weight: Option<Vec<f64>>,
    /// The label to ignore; `None` means -100.
    pub ignore_index: Option<i64>,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// 'mean' without `avg_factor` averages over the non-ignored labels only.
    pub avg_non_ignore: bool,
    /// The CrossEntropyLoss of these fields, kept between calls for its device copy of
    /// `class_weight` (rebuilt when a field changes).
    #[serde(skip)]
    base: std::sync::Mutex<Option<CrossEntropyLoss>>,
}

impl Default for CrossEntropyCustomLoss {
    fn default() -> Self {
        let base = CrossEntropyLoss::default();
        Self {
            use_sigmoid: base.use_sigmoid,
            use_mask: base.use_mask,
            reduction: base.reduction,
            num_classes: -1,
            class_weight: None,
            ignore_index: None,
            loss_weight: base.loss_weight,
            avg_non_ignore: base.avg_non_ignore,
            base: Default::default(),
        }
    }
}

impl Clone for CrossEntropyCustomLoss {
    fn clone(&self) -> Self {
        Self {
            class_weight: self.class_weight.clone(),
            base: Default::default(),
            ..*self
        }
    }
}

const CUSTOM: &str = "CrossEntropyCustomLoss";

impl CrossEntropyCustomLoss {
    /// MMDetection's constructor checks.
    pub fn validate(&self) -> Result<()> {
        self.as_base()
            .validate()
            .map_err(|e| anyhow::anyhow!("{CUSTOM}: {e}"))?;
        ensure!(
            self.num_classes != -1,
            "{CUSTOM}: num_classes is required (got -1)"
        );
        Ok(())
    }

    fn as_base(&self) -> CrossEntropyLoss {
        CrossEntropyLoss {
            use_sigmoid: self.use_sigmoid,
            use_mask: self.use_mask,
            reduction: self.reduction,
            class_weight: self.class_weight.clone(),
            ignore_index: self.ignore_index,
            loss_weight: self.loss_weight,
            avg_non_ignore: self.avg_non_ignore,
            class_weight_copy: Default::default(),
        }
    }

    fn with_base<R>(&self, f: impl FnOnce(&CrossEntropyLoss) -> Result<R>) -> Result<R> {
        self.validate()?;
        let mut base = self
            .base
            .lock()
            .map_err(|_| anyhow::anyhow!("{CUSTOM}: a lock is poisoned"))?;
        let wanted = self.as_base();
        if base.as_ref() != Some(&wanted) {
            *base = Some(wanted);
        }
        f(base.as_ref().expect("set above"))
    }

    /// `get_cls_channels(num_classes)`: `num_classes + 1` for the softmax, `num_classes` for
    /// the sigmoid.
    pub fn get_cls_channels(&self, num_classes: i64) -> Result<i64> {
        ensure!(
            num_classes == self.num_classes,
            "{CUSTOM}: get_cls_channels({num_classes}) of a loss of {} classes",
            self.num_classes
        );
        Ok(if self.use_sigmoid {
            num_classes
        } else {
            num_classes + 1
        })
    }

    /// `get_activation(cls_score)`: softmax: the softmax over the first `num_classes` columns
    /// and the last one (columns between them are dropped, as in MMDetection); sigmoid: the
    /// sigmoid of the first `num_classes` columns and `clamp(1 - their sum, 0, 1)`.
    pub fn get_activation(&self, cls_score: &Tensor) -> Result<Tensor> {
        ensure!(
            cls_score.dim() == 2 && cls_score.size()[1] > 0,
            "{CUSTOM}: get_activation takes (N, C) scores, got shape {:?}",
            cls_score.size()
        );
        let c = cls_score.size()[1];
        let fine = cls_score.f_narrow(1, 0, self.num_classes.clamp(0, c))?;
        if !self.use_sigmoid {
            let bg = cls_score.f_narrow(1, c - 1, 1)?;
            return Ok(Tensor::f_cat(&[fine, bg], -1)?.f_softmax(-1, None::<Kind>)?);
        }
        let classes = fine.f_sigmoid()?;
        let neg = classes
            .f_sum_dim_intlist(1, true, None::<Kind>)?
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_clamp(0.0, 1.0)?;
        Ok(Tensor::f_cat(&[classes, neg], 1)?)
    }
}

impl Loss for CrossEntropyCustomLoss {
    fn type_name(&self) -> &str {
        CUSTOM
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.with_base(|b| b.forward_named(CUSTOM, pred, target, args))
    }

    /// CrossEntropyLoss's stock-op composition.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.with_base(|b| b.forward_unfused_named(CUSTOM, pred, target, args))
    }

    fn get_activation(&self, cls_score: &Tensor) -> Result<Option<Tensor>> {
        Self::get_activation(self, cls_score).map(Some)
    }
}
