//! mmdet/models/losses/balanced_l1_loss.py: [`BalancedL1Loss`] (kernel body
//! `kernels/balanced_l1.cuh`).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::smooth_l1::Elementwise;
use crate::fused::Body;
use crate::reduction::Reduction;
use crate::{Loss, LossArgs, Target};

const NAME: &str = "BalancedL1Loss";

/// MMDetection's `BalancedL1Loss` (Libra R-CNN): with `d = |pred - target|` and
/// `b = e^(gamma / alpha) - 1`, `alpha / b (b d + 1) ln(b d / beta + 1) - alpha d` where
/// `d < beta` and `gamma d + gamma / b - alpha beta` elsewhere, element-wise over `(N, K)`.
///
/// The weight broadcasts against `(N, K)` by torch's rules. Unlike L1Loss and SmoothL1Loss it has
/// no zero-weight short-cut.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "BalancedL1Loss", "alpha": 0.5, "gamma": 1.5, "beta": 1.0}"#)?;
/// let pred = Tensor::randn([8, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let target = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
/// loss.forward(&pred, (&target).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalancedL1Loss {
    /// The weight of the inlier gradient.
    pub alpha: f64,
    /// The bound of the outlier gradient.
    pub gamma: f64,
    /// Where the inlier part ends; must be > 0.
    pub beta: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}

impl Default for BalancedL1Loss {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            gamma: 1.5,
            beta: 1.0,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
        }
    }
}

impl BalancedL1Loss {
    /// MMDetection's `assert beta > 0`, and the divisions by alpha and b that Python would raise
    /// ZeroDivisionError on.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.beta > 0.0,
            "{NAME}: beta must be > 0, got {}",
            self.beta
        );
        ensure!(self.alpha != 0.0, "{NAME}: alpha must not be 0");
        ensure!(
            self.b() != 0.0,
            "{NAME}: gamma / alpha = {} gives b = e^(gamma / alpha) - 1 = 0, which the loss divides by",
            self.gamma / self.alpha
        );
        Ok(())
    }

    /// `np.e ** (gamma / alpha) - 1`, in float64 as Python computes it.
    fn b(&self) -> f64 {
        std::f64::consts::E.powf(self.gamma / self.alpha) - 1.0
    }

    fn call(&self) -> Elementwise {
        Elementwise {
            name: NAME,
            body: Body::BalancedL1,
            params: [self.alpha, self.gamma, self.beta, self.b()],
            shortcut: false,
            reduction: self.reduction,
            loss_weight: self.loss_weight,
        }
    }
}

impl Loss for BalancedL1Loss {
    fn type_name(&self) -> &str {
        NAME
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.validate()?;
        self.call().forward(pred, target, args)
    }

    /// `balanced_l1_loss` in stock ops.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.validate()?;
        let (alpha, gamma, beta, b) = (self.alpha, self.gamma, self.beta, self.b());
        self.call().unfused(pred, target, args, |p, t| {
            let diff = p.f_sub(t)?.f_abs()?;
            let inner = diff
                .f_mul_scalar(b)?
                .f_add_scalar(1.0)?
                .f_mul_scalar(alpha / b)?
                .f_mul(
                    &diff
                        .f_mul_scalar(b)?
                        .f_div_scalar(beta)?
                        .f_add_scalar(1.0)?
                        .f_log()?,
                )?
                .f_sub(&diff.f_mul_scalar(alpha)?)?;
            let outer = diff
                .f_mul_scalar(gamma)?
                .f_add_scalar(gamma / b)?
                .f_sub_scalar(alpha * beta)?;
            Ok(inner.f_where_self(&diff.f_lt(beta)?, &outer)?)
        })
    }
}
