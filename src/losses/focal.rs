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
            "FocalLoss: only sigmoid focal loss is supported (use_sigmoid must be true)"
        );
        Ok(())
    }

    /// MMDetection's weight handling: `(N,)` becomes `(N, 1)`, `(N*C,)` becomes `(N, C)`.
    /// Anything else is an error that names the shape the user passed.
    fn weight_view(w: &Tensor, n: i64, c: i64) -> Result<Tensor> {
        if w.size() == [n, c] {
            return Ok(w.shallow_clone());
        }
        let bad = || {
            anyhow::anyhow!(
                "FocalLoss: weight of shape {:?} is neither ({n},), ({},) nor ({n}, {c})",
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
        "FocalLoss"
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.validate()?;
        let reduction = begin("FocalLoss", pred, target, args, self.reduction)?;
        let t = single_target("FocalLoss", target)?;
        let (n, c) = pred_shape("FocalLoss", pred)?;
        let weight = args
            .weight
            .map(|w| Self::weight_view(w, n, c))
            .transpose()?;
        let kt = if t.dim() == pred.dim() {
            KTarget::Dense(t)
        } else {
            KTarget::Labels(t)
        };
        // Slots: p0 = gamma, p1 = alpha (kernels/focal.cuh).
        let mut spec = Spec::new(
            Body::Focal,
            NAME,
            Shape::Element,
            reduction,
            self.loss_weight,
        );
        spec.params = [self.gamma, self.alpha, 0.0, 0.0];
        spec.flags = FLAG_STRICT_LABELS | if self.activated { FLAG_ACTIVATED } else { 0 };
        fused::run(spec, pred, kt, weight.as_ref(), args.avg_factor.as_ref())
    }

    /// `py_sigmoid_focal_loss` (or `py_focal_loss_with_prob`) in stock ops.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.validate()?;
        let reduction = begin("FocalLoss", pred, target, args, self.reduction)?;
        let t = single_target("FocalLoss", target)?;
        let (n, c) = pred_shape("FocalLoss", pred)?;
        let target = if t.dim() == pred.dim() {
            ensure!(
                t.size() == pred.size(),
                "FocalLoss: target must have pred's shape {:?}, got {:?}",
                pred.size(),
                t.size()
            );
            t.f_detach()?
        } else {
            one_hot_without_background("FocalLoss", t, c)?
        };
        let target = target.f_type_as(pred)?;
        let (p, elem) = if self.activated {
            (pred.shallow_clone(), bce("FocalLoss", pred, &target)?)
        } else {
            (pred.f_sigmoid()?, bce_with_logits(pred, &target)?)
        };
        let pt: Tensor = (1.0 - &p) * &target + &p * (1.0 - &target);
        let focal_weight: Tensor = (&target * self.alpha + (1.0 - &target) * (1.0 - self.alpha))
            * pt.f_pow_tensor_scalar(self.gamma)?;
        let loss = elem.f_mul(&focal_weight)?;
        let weight = args
            .weight
            .map(|w| Self::weight_view(w, n, c))
            .transpose()?;
        Ok(
            weight_reduce_loss(&loss, weight.as_ref(), reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}
