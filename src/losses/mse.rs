//! mmdet/models/losses/mse_loss.py: [`MSELoss`] (kernel body `kernels/mse.cuh`).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{begin, single_target};
use crate::fused::{Body, Shape, Spec};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{Loss, LossArgs, Target};

const NAME: &str = "MSELoss";

/// MMDetection's `MSELoss`: `F.mse_loss(pred, target, reduction='none')`, `(pred - target)^2`
/// element-wise, through `weighted_loss` (the weight multiplies the element loss, then the
/// reduction with `avg_factor`, then `loss_weight`).
///
/// The fused kernel takes a target of pred's shape and a weight that broadcasts against pred
/// without growing it (any such weight for a 2-D pred, none or one of pred's shape otherwise).
/// Other calls that MMDetection accepts (a target torch broadcasts against pred, a weight that
/// grows the loss, an empty pred) run the stock composition, as MMDetection computes them.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "MSELoss", "loss_weight": 0.5}"#)?;
/// let pred = Tensor::randn([8, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let target = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
/// loss.forward(&pred, (&target).into(), &LossArgs::new().avg_factor(8.0))?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MSELoss {
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}

impl Default for MSELoss {
    fn default() -> Self {
        Self {
            reduction: Reduction::Mean,
            loss_weight: 1.0,
        }
    }
}

impl MSELoss {
    /// MMDetection's constructor checks (there are none).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

impl Loss for MSELoss {
    fn type_name(&self) -> &str {
        NAME
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let t = single_target(NAME, target)?;
        super::check_broadcasts(NAME, pred, t, args.weight)?;
        let Some(view) = super::element_view(pred, t, args.weight) else {
            return self.forward_unfused(pred, target, args);
        };
        let spec = Spec::new(Body::Mse, NAME, Shape::Element, reduction, self.loss_weight);
        super::run_element_view(spec, view, pred, t, args)
    }

    /// `mse_loss` in stock ops: `F.mse_loss(pred, target, reduction='none')`, then
    /// `weight_reduce_loss` and `loss_weight`.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let t = single_target(NAME, target)?;
        super::check_broadcasts(NAME, pred, t, args.weight)?;
        let loss = pred.f_mse_loss(&t.f_type_as(pred)?, tch::Reduction::None)?;
        Ok(
            weight_reduce_loss(&loss, args.weight, reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}
