//! `FocalLoss` (mmdet/models/losses/focal_loss.py): the sigmoid focal loss of RetinaNet and its
//! kin. Kernel body: `kernels/focal.cuh`.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{bce, bce_with_logits, begin, one_hot_without_background, pred_shape, single_target};
use crate::abi::{FLAG_ACTIVATED, FLAG_STRICT_LABELS};
use crate::fused::{self, Body, KTarget, Shape, Spec};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{Loss, LossArgs, Target};

const NAME: &str = "FocalLoss";

/// MMDetection's `FocalLoss`:
/// `BCE(x, t) * (alpha t + (1 - alpha)(1 - t)) * pt^gamma`, `pt = (1 - p) t + p (1 - t)`.
///
/// Targets: class indices `(N,)` with background `C`, or a dense `(N, C)` target (one-hot or
/// soft). Weights: `(N,)` (per anchor), `(N*C,)` or `(N, C)`.
///
/// ```
/// use tch_detloss::{losses::FocalLoss, Loss, LossArgs};
/// let loss = FocalLoss { gamma: 1.5, alpha: 0.5, ..Default::default() };
/// let pred = tch::Tensor::randn([4, 3], (tch::Kind::Float, tch::Device::Cpu));
/// let labels = tch::Tensor::from_slice(&[0i64, 2, 3, 1]);
/// let l = loss.forward(&pred, (&labels).into(), &LossArgs::new())?;
/// assert_eq!(l.size(), Vec::<i64>::new());
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FocalLoss {
    /// Must be true: MMDetection supports only the sigmoid focal loss.
    pub use_sigmoid: bool,
    /// The focusing exponent.
    pub gamma: f64,
    /// The weight of positives (negatives get `1 - alpha`).
    pub alpha: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// `pred` holds probabilities rather than logits.
    pub activated: bool,
}

impl Default for FocalLoss {
    fn default() -> Self {
        Self {
            use_sigmoid: true,
            gamma: 2.0,
            alpha: 0.25,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
            activated: false,
        }
    }
}

impl FocalLoss {
    /// MMDetection's constructor checks.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.use_sigmoid,
            "{NAME}: only sigmoid focal loss is supported (use_sigmoid must be true)"
        );
        Ok(())
    }

    /// MMDetection's weight handling: `(N,)` becomes `(N, 1)`, `(N*C,)` becomes `(N, C)`.
    /// Anything else is an error that names the shape the user passed.
    fn weight_view(name: &str, w: &Tensor, n: i64, c: i64) -> Result<Tensor> {
        if w.size() == [n, c] {
            return Ok(w.shallow_clone());
        }
        let bad = || {
            anyhow::anyhow!(
                "{name}: weight of shape {:?} is neither ({n},), ({},) nor ({n}, {c})",
                w.size(),
                n * c
            )
        };
        let view = if w.dim() >= 1 && w.size()[0] == n {
            w.f_reshape([-1, 1])?
        } else if w.dim() >= 1 && w.numel() as i64 == n * c && n > 0 {
            w.f_reshape([n, -1])?
        } else {
            return Err(bad());
        };
        // MMDetection's view(-1, 1) of an (N, k) weight, k > 1, no longer broadcasts.
        let _ = view.f_expand([n, c], false).map_err(|_| bad())?;
        Ok(view)
    }
}

impl Loss for FocalLoss {
    fn type_name(&self) -> &str {
        NAME
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.forward_named(NAME, pred, target, args)
    }

    /// `py_sigmoid_focal_loss` (or `py_focal_loss_with_prob`) in stock ops.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.forward_unfused_named(NAME, pred, target, args)
    }
}

impl FocalLoss {
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
        let (n, c) = pred_shape(name, pred)?;
        let weight = args
            .weight
            .map(|w| Self::weight_view(name, w, n, c))
            .transpose()?;
        let kt = if t.dim() == pred.dim() {
            KTarget::Dense(t)
        } else {
            KTarget::Labels(t)
        };
        // Slots: p0 = gamma, p1 = alpha (kernels/focal.cuh).
        let mut spec = Spec::new(
            Body::Focal,
            name,
            Shape::Element,
            reduction,
            self.loss_weight,
        );
        spec.params = [self.gamma, self.alpha, 0.0, 0.0];
        spec.flags = FLAG_STRICT_LABELS | if self.activated { FLAG_ACTIVATED } else { 0 };
        fused::run(spec, pred, kt, weight.as_ref(), args.avg_factor.as_ref())
    }

    /// `py_sigmoid_focal_loss` (or `py_focal_loss_with_prob`) in stock ops.
    pub(crate) fn forward_unfused_named(
        &self,
        name: &'static str,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.validate()?;
        let reduction = begin(name, pred, target, args, self.reduction)?;
        let t = single_target(name, target)?;
        let (n, c) = pred_shape(name, pred)?;
        let target = if t.dim() == pred.dim() {
            ensure!(
                t.size() == pred.size(),
                "{name}: target must have pred's shape {:?}, got {:?}",
                pred.size(),
                t.size()
            );
            t.f_detach()?
        } else {
            one_hot_without_background(name, t, c)?
        };
        let target = target.f_type_as(pred)?;
        let (p, elem) = if self.activated {
            (pred.shallow_clone(), bce(name, pred, &target)?)
        } else {
            (pred.f_sigmoid()?, bce_with_logits(pred, &target)?)
        };
        let pt: Tensor = (1.0 - &p) * &target + &p * (1.0 - &target);
        let focal_weight: Tensor = (&target * self.alpha + (1.0 - &target) * (1.0 - self.alpha))
            * pt.f_pow_tensor_scalar(self.gamma)?;
        let loss = elem.f_mul(&focal_weight)?;
        let weight = args
            .weight
            .map(|w| Self::weight_view(name, w, n, c))
            .transpose()?;
        Ok(
            weight_reduce_loss(&loss, weight.as_ref(), reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}

/// MMDetection's `FocalCustomLoss` (V3Det): [`FocalLoss`]'s sigmoid focal loss on class indices
/// `(N,)` in `[0, C]`, where `C` is pred's column count (not `num_classes`) and `C` is background.
/// MMDetection always takes its stock-op form here; `activated` is kept but ignored (pred is
/// logits), as in MMDetection. Weights as FocalLoss's: `(N,)`, `(N*C,)` or `(N, C)`.
///
/// ```
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "FocalCustomLoss", "num_classes": 3}"#)?;
/// let pred = tch::Tensor::randn([4, 3], (tch::Kind::Float, tch::Device::Cpu));
/// let labels = tch::Tensor::from_slice(&[0i64, 2, 3, 1]);
/// let l = loss.forward(&pred, (&labels).into(), &LossArgs::new())?;
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FocalCustomLoss {
    /// Must be true.
    pub use_sigmoid: bool,
    /// The class count; required (MMDetection asserts it is not -1).
    pub num_classes: i64,
    /// The focusing exponent.
    pub gamma: f64,
    /// The weight of positives (negatives get `1 - alpha`).
    pub alpha: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// Stored and ignored, as in MMDetection.
    pub activated: bool,
}

impl Default for FocalCustomLoss {
    fn default() -> Self {
        Self {
            use_sigmoid: true,
            num_classes: -1,
            gamma: 2.0,
            alpha: 0.25,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
            activated: false,
        }
    }
}

const CUSTOM: &str = "FocalCustomLoss";

impl FocalCustomLoss {
    /// MMDetection's constructor checks.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.use_sigmoid,
            "{CUSTOM}: Only sigmoid focal loss supported now."
        );
        ensure!(
            self.num_classes != -1,
            "{CUSTOM}: num_classes is required (got -1)"
        );
        Ok(())
    }

    /// `get_cls_channels(num_classes)`: the classifier's output channels, `num_classes`.
    pub fn get_cls_channels(&self, num_classes: i64) -> Result<i64> {
        ensure!(
            num_classes == self.num_classes,
            "{CUSTOM}: get_cls_channels({num_classes}) of a loss of {} classes",
            self.num_classes
        );
        Ok(num_classes)
    }

    /// `get_activation(cls_score)`: the sigmoid of the first `num_classes` columns.
    pub fn get_activation(&self, cls_score: &Tensor) -> Result<Tensor> {
        let c = cls_score.size().get(1).copied().unwrap_or(0);
        Ok(cls_score
            .f_narrow(1, 0, self.num_classes.clamp(0, c))?
            .f_sigmoid()?)
    }

    /// The FocalLoss it computes, on class indices only (MMDetection one-hots the target).
    fn focal(&self, pred: &Tensor, target: Target<'_>) -> Result<FocalLoss> {
        self.validate()?;
        crate::checks::floating(CUSTOM, "pred", pred)?;
        let t = single_target(CUSTOM, target)?;
        crate::checks::integer(CUSTOM, "target", t)?;
        ensure!(
            t.dim() == 1,
            "{CUSTOM}: target must be class indices (N,) (MMDetection one-hots it), got shape {:?}",
            t.size()
        );
        Ok(FocalLoss {
            use_sigmoid: true,
            gamma: self.gamma,
            alpha: self.alpha,
            reduction: self.reduction,
            loss_weight: self.loss_weight,
            activated: false,
        })
    }
}

impl Loss for FocalCustomLoss {
    fn type_name(&self) -> &str {
        CUSTOM
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.focal(pred, target)?
            .forward_named(CUSTOM, pred, target, args)
    }

    /// `py_sigmoid_focal_loss` on the one-hot target, in stock ops.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.focal(pred, target)?
            .forward_unfused_named(CUSTOM, pred, target, args)
    }

    fn get_activation(&self, cls_score: &Tensor) -> Result<Option<Tensor>> {
        Self::get_activation(self, cls_score).map(Some)
    }
}
