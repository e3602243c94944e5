//! mmdet/models/losses/kd_loss.py: [`KnowledgeDistillationKLDivLoss`], the distillation loss of
//! the LD heads.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{begin, row_weight, single_target};
use crate::fused::{self, Body, KTarget, Shape, Spec};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{Loss, LossArgs, Target};

const NAME: &str = "KnowledgeDistillationKLDivLoss";

/// MMDetection's `KnowledgeDistillationKLDivLoss`: per row,
/// `T^2 * mean_c kl_div(log_softmax(pred / T), softmax(soft_label / T))` with the teacher's
/// distribution detached (no gradient reaches `soft_label`). pred and the soft label are `(N, C)`
/// logits; 'none' gives `(N,)`; the weight is per row.
///
/// Fused: one scan-row kernel (kernels/kd.cuh) reads both rows and writes the loss and, on the
/// CPU, the gradient in the same pass; [`Loss::forward_unfused`] is the stock-op composition
/// (`log_softmax`, `softmax`, `kl_div`).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "KnowledgeDistillationKLDivLoss", "T": 4}"#)?;
/// let student = Tensor::randn([8, 17], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let teacher = Tensor::randn([8, 17], (Kind::Float, Device::Cpu));
/// loss.forward(&student, (&teacher).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KnowledgeDistillationKLDivLoss {
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// The temperature, at least 1.
    #[serde(rename = "T")]
    pub t: f64,
}

impl Default for KnowledgeDistillationKLDivLoss {
    fn default() -> Self {
        Self {
            reduction: Reduction::Mean,
            loss_weight: 1.0,
            t: 10.0,
        }
    }
}

impl KnowledgeDistillationKLDivLoss {
    /// MMDetection's `assert T >= 1`.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.t >= 1.0,
            "{NAME}: T must be at least 1, got {}",
            self.t
        );
        Ok(())
    }
}

impl KnowledgeDistillationKLDivLoss {
    /// The checks both paths share; returns the call's reduction and the soft label.
    fn begin<'a>(
        &self,
        pred: &Tensor,
        target: Target<'a>,
        args: &LossArgs<'_>,
    ) -> Result<(Reduction, &'a Tensor)> {
        self.validate()?;
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        let soft = single_target(NAME, target)?;
        ensure!(
            pred.dim() == 2 && soft.size() == pred.size(),
            "{NAME}: pred and the soft label (target) must be (N, C) logits of one shape, got {:?} and {:?}",
            pred.size(),
            soft.size()
        );
        crate::checks::floating(NAME, "target", soft)?;
        Ok((reduction, soft))
    }

    /// `knowledge_distillation_kl_div_loss` in stock ops.
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let (reduction, soft) = self.begin(pred, target, args)?;
        let t = self.t;
        let teacher = soft
            .f_div_scalar(t)?
            .f_softmax(1, None::<Kind>)?
            .f_detach()?;
        let student = pred.f_div_scalar(t)?.f_log_softmax(1, None::<Kind>)?;
        let loss = student
            .f_kl_div(&teacher, tch::Reduction::None, false)?
            .f_mean_dim(1, false, None::<Kind>)?
            .f_mul_scalar(t * t)?;
        if let Some(w) = args.weight {
            super::check_weight_shape(NAME, w, &loss.size())?;
        }
        Ok(
            weight_reduce_loss(&loss, args.weight, reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}

impl Loss for KnowledgeDistillationKLDivLoss {
    fn type_name(&self) -> &str {
        NAME
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let (reduction, soft) = self.begin(pred, target, args)?;
        let weight = args
            .weight
            .map(|w| row_weight(NAME, w, pred.size()[0]))
            .transpose()?;
        let mut spec = Spec::new(Body::Kd, NAME, Shape::Row, reduction, self.loss_weight);
        spec.params[0] = self.t;
        fused::run(
            spec,
            pred,
            KTarget::Dense(soft),
            weight.as_ref(),
            args.avg_factor.as_ref(),
        )
    }

    /// The stock-op composition.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.composed(pred, target, args)
    }
}
