//! mmdet/models/losses/kd_loss.py: [`KnowledgeDistillationKLDivLoss`], the distillation loss of
//! the LD heads.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{begin, single_target};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{LossArgs, Target};

const NAME: &str = "KnowledgeDistillationKLDivLoss";

/// MMDetection's `KnowledgeDistillationKLDivLoss`: per row,
/// `T^2 * mean_c kl_div(log_softmax(pred / T), softmax(soft_label / T))` with the teacher's
/// distribution detached (no gradient reaches `soft_label`). pred and the soft label are `(N, C)`
/// logits; 'none' gives `(N,)`; the weight is per row.
///
/// Composed of stock ops (`log_softmax`, `softmax`, `kl_div`).
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
    /// `knowledge_distillation_kl_div_loss` in stock ops.
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
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

super::composed_loss!(KnowledgeDistillationKLDivLoss, NAME);
