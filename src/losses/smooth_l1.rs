//! mmdet/models/losses/smooth_l1_loss.py: [`SmoothL1Loss`] and [`L1Loss`] (kernel bodies
//! `kernels/smooth_l1.cuh`, `kernels/l1.cuh`), and the element-wise box-loss call they share with
//! BalancedL1Loss.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{begin, shortcut, single_target};
use crate::checks::broadcast_shapes;
use crate::fused::{self, Body, KTarget, Shape, Spec};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{Loss, LossArgs, Target};

/// An element-wise box regression loss as MMDetection's `weighted_loss` functions run it: the
/// element loss over `pred` and `target` of one shape `(N, K)`, `weight` broadcast against it by
/// torch's rules, then the reduction and `loss_weight`.
pub(super) struct Elementwise {
    pub name: &'static str,
    pub body: Body,
    /// The body's slots p0..p3.
    pub params: [f64; 4],
    /// The class has MMDetection's zero-weight short-cut (L1, SmoothL1; not BalancedL1).
    pub shortcut: bool,
    pub reduction: Reduction,
    pub loss_weight: f64,
}

impl Elementwise {
    /// `(pred, target, reduction)` after the checks both paths run, or `None` for MMDetection's
    /// empty target, whose loss is `pred.sum() * 0`.
    fn start<'a>(
        &self,
        pred: &Tensor,
        target: Target<'a>,
        args: &LossArgs<'_>,
    ) -> Result<(&'a Tensor, Reduction)> {
        let reduction = begin(self.name, pred, target, args, self.reduction)?;
        let t = single_target(self.name, target)?;
        Ok((t, reduction))
    }

    /// Whether the loss itself takes the weight: torch's broadcast of the weight against the
    /// loss, which must not grow the loss.
    fn weight_ok(&self, pred: &Tensor, w: &Tensor) -> Result<()> {
        let fits = broadcast_shapes(&pred.size(), &w.size()).map(|out| out == pred.size());
        match fits {
            Ok(true) => Ok(()),
            // torch's own message where torch raises, as MMDetection's users know it.
            Err(e) => bail!("{}: weight of shape {:?}: {e}", self.name, w.size()),
            Ok(false) => bail!(
                "{}: weight of shape {:?} does not broadcast against the loss of shape {:?}",
                self.name,
                w.size(),
                pred.size()
            ),
        }
    }

    /// The fused call.
    pub fn forward(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        let (t, reduction) = self.start(pred, target, args)?;
        if t.numel() == 0 {
            // Nothing to fuse; the stock ops read nothing back for an empty weight either.
            return self.unfused(pred, target, args, |_, _| unreachable_loss());
        }
        ensure!(
            pred.size() == t.size(),
            "{}: pred and target must have one shape, got {:?} and {:?}",
            self.name,
            pred.size(),
            t.size()
        );
        ensure!(
            pred.dim() == 2,
            "{}: pred must be (N, K) (boxes: (N, 4)), got shape {:?}",
            self.name,
            pred.size()
        );
        let mut spec = Spec::new(
            self.body,
            self.name,
            Shape::Element,
            reduction,
            self.loss_weight,
        );
        spec.params = self.params;
        let normal = args.weight.map_or(Ok(()), |w| self.weight_ok(pred, w));
        let plan = if self.shortcut {
            shortcut::plan(pred, args.weight, reduction, true, normal)?
        } else {
            normal?;
            shortcut::Plan::Fused
        };
        match plan {
            shortcut::Plan::Fused => {
                spec.shortcut = self.shortcut;
                fused::run(
                    spec,
                    pred,
                    KTarget::Dense(t),
                    args.weight,
                    args.avg_factor.as_ref(),
                )
            }
            shortcut::Plan::Taken(view) => {
                spec.shortcut = true;
                spec.reduction = Reduction::Sum;
                fused::run(spec, pred, KTarget::Dense(t), Some(&view), None)
            }
        }
    }

    /// The stock-op call, as MMDetection's class and `weighted_loss` write it; `elem` is the
    /// element loss of `(pred, target)`.
    pub fn unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
        elem: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (t, reduction) = self.start(pred, target, args)?;
        if self.shortcut {
            if let Some(w) = args.weight {
                if shortcut::no_positive(w)? {
                    return shortcut::unfused(pred, w);
                }
            }
        }
        let loss = if t.numel() == 0 {
            pred.f_sum(pred.kind())?.f_mul_scalar(0.0)?
        } else {
            ensure!(
                pred.size() == t.size(),
                "{}: pred and target must have one shape, got {:?} and {:?}",
                self.name,
                pred.size(),
                t.size()
            );
            elem(pred, &t.f_type_as(pred)?)?
        };
        if let Some(w) = args.weight {
            if t.numel() != 0 {
                self.weight_ok(pred, w)?;
            }
        }
        Ok(
            weight_reduce_loss(&loss, args.weight, reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}

/// The element loss of an empty target is never formed (`pred.sum() * 0` stands for it).
fn unreachable_loss() -> Result<Tensor> {
    anyhow::bail!("the element loss of an empty target is not formed")
}

/// MMDetection's `SmoothL1Loss`: with `d = |pred - target|`, `0.5 d^2 / beta` where `d < beta`
/// and `d - 0.5 beta` elsewhere, element-wise over `(N, K)` boxes or deltas.
///
/// The weight broadcasts against `(N, K)` by torch's rules (an `(N,)` weight only when N == K,
/// as in MMDetection). Where a weight is given and none of it is > 0, the result is MMDetection's
/// short-cut `(pred * weight).sum()`, decided on the device for 'mean' and 'sum' and with one
/// host read for 'none' (see the README).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "SmoothL1Loss", "beta": 0.11, "loss_weight": 1.0}"#)?;
/// let pred = Tensor::randn([8, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let target = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
/// let bbox_weights = Tensor::ones([8, 4], (Kind::Float, Device::Cpu));
/// let l = loss.forward(&pred, (&target).into(), &LossArgs::new().weight(&bbox_weights).avg_factor(8.0))?;
/// l.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmoothL1Loss {
    /// Where the quadratic part ends; must be > 0.
    pub beta: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}

impl Default for SmoothL1Loss {
    fn default() -> Self {
        Self {
            beta: 1.0,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
        }
    }
}

impl SmoothL1Loss {
    /// MMDetection's `assert beta > 0`, at build time as well as per call.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.beta > 0.0,
            "SmoothL1Loss: beta must be > 0, got {}",
            self.beta
        );
        Ok(())
    }

    fn call(&self) -> Elementwise {
        Elementwise {
            name: "SmoothL1Loss",
            body: Body::SmoothL1,
            params: [self.beta, 0.0, 0.0, 0.0],
            shortcut: true,
            reduction: self.reduction,
            loss_weight: self.loss_weight,
        }
    }
}

impl Loss for SmoothL1Loss {
    fn type_name(&self) -> &str {
        "SmoothL1Loss"
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.validate()?;
        self.call().forward(pred, target, args)
    }

    /// `smooth_l1_loss` in stock ops: `torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)`.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.validate()?;
        let beta = self.beta;
        self.call().unfused(pred, target, args, |p, t| {
            let diff = p.f_sub(t)?.f_abs()?;
            let quad = diff.f_mul_scalar(0.5)?.f_mul(&diff)?.f_div_scalar(beta)?;
            let lin = diff.f_sub_scalar(0.5 * beta)?;
            Ok(quad.f_where_self(&diff.f_lt(beta)?, &lin)?)
        })
    }
}

/// MMDetection's `L1Loss`: `|pred - target|`, element-wise over `(N, K)`, with the weight
/// handling and the zero-weight short-cut of [`SmoothL1Loss`].
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "L1Loss", "loss_weight": 1.0}"#)?;
/// let pred = Tensor::randn([8, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let target = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
/// loss.forward(&pred, (&target).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct L1Loss {
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}

impl Default for L1Loss {
    fn default() -> Self {
        Self {
            reduction: Reduction::Mean,
            loss_weight: 1.0,
        }
    }
}

impl L1Loss {
    /// MMDetection's constructor checks (there are none).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }

    fn call(&self) -> Elementwise {
        Elementwise {
            name: "L1Loss",
            body: Body::L1,
            params: [0.0; 4],
            shortcut: true,
            reduction: self.reduction,
            loss_weight: self.loss_weight,
        }
    }
}

impl Loss for L1Loss {
    fn type_name(&self) -> &str {
        "L1Loss"
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.call().forward(pred, target, args)
    }

    /// `l1_loss` in stock ops: `torch.abs(pred - target)`.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.call()
            .unfused(pred, target, args, |p, t| Ok(p.f_sub(t)?.f_abs()?))
    }
}
