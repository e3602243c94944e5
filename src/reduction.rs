//! Steps 3 to 5 of the pipeline as MMDetection defines them (`mmdet/models/losses/utils.py`):
//! element weights, the reduction with `avg_factor`, and the scalar `loss_weight`.
//!
//! The fused kernels apply these inside their single pass; [`weight_reduce_loss`] is the stock-op
//! version used by the unfused compositions.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// `torch.finfo(torch.float32).eps`, which MMDetection adds to `avg_factor` whatever the dtype.
pub const AVG_FACTOR_EPS: f64 = 1.192_092_895_507_812_5e-7;

/// How element losses are reduced: MMDetection's `reduction` (`"none"`, `"mean"`, `"sum"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
// The discriminants are the kernels' RED_* codes (kernels/common.cuh).
pub enum Reduction {
    /// The element losses, in the loss's own output shape.
    None = 0,
    /// The sum divided by the element count, or by `avg_factor + eps` when one is given.
    #[default]
    Mean = 1,
    /// The sum. Combined with an `avg_factor` it is an error, as in MMDetection.
    Sum = 2,
}

impl std::str::FromStr for Reduction {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "mean" => Ok(Self::Mean),
            "sum" => Ok(Self::Sum),
            _ => bail!("unknown reduction {s:?}: expected \"none\", \"mean\" or \"sum\""),
        }
    }
}

/// The divisor of `reduction="mean"`: a number, or a 0-dim tensor that stays on its device (the
/// kernels read it there, so no value is read back to the host and the step stays capturable in
/// a CUDA graph).
///
/// ```
/// use tch_detloss::AvgFactor;
/// let a: AvgFactor = 9.0.into();
/// let b = AvgFactor::from(&tch::Tensor::from(9.0f32));
/// # let _ = (a, b);
/// ```
#[derive(Debug)]
pub enum AvgFactor {
    /// A host number.
    Value(f64),
    /// A one-element tensor (any floating kind, on any device).
    Tensor(Tensor),
}

impl From<f64> for AvgFactor {
    fn from(v: f64) -> Self {
        Self::Value(v)
    }
}
impl From<f32> for AvgFactor {
    fn from(v: f32) -> Self {
        Self::Value(v.into())
    }
}
impl From<Tensor> for AvgFactor {
    fn from(t: Tensor) -> Self {
        Self::Tensor(t)
    }
}
impl From<&Tensor> for AvgFactor {
    fn from(t: &Tensor) -> Self {
        Self::Tensor(t.shallow_clone())
    }
}

impl Clone for AvgFactor {
    fn clone(&self) -> Self {
        match self {
            Self::Value(v) => Self::Value(*v),
            Self::Tensor(t) => Self::Tensor(t.shallow_clone()),
        }
    }
}

/// The message MMDetection raises for `reduction="sum"` with an `avg_factor`.
pub(crate) const SUM_WITH_AVG_FACTOR: &str = "avg_factor can not be used with reduction=\"sum\"";

/// Rejects the combinations MMDetection rejects before any work is done, and an `avg_factor`
/// tensor that is not a real one-element tensor.
pub(crate) fn check_avg_factor(
    name: &str,
    reduction: Reduction,
    avg_factor: Option<&AvgFactor>,
) -> Result<()> {
    if reduction == Reduction::Sum && avg_factor.is_some() {
        bail!("{name}: {SUM_WITH_AVG_FACTOR}");
    }
    if let Some(AvgFactor::Tensor(t)) = avg_factor {
        crate::checks::real(name, "avg_factor", t)?;
        if t.numel() != 1 {
            bail!(
                "{name}: avg_factor must be a number or a one-element tensor, got shape {:?}",
                t.size()
            );
        }
    }
    Ok(())
}

/// MMDetection's `weight_reduce_loss` in stock tch ops: multiply by `weight` (plain broadcasting),
/// then reduce; with `avg_factor`, `mean` is `loss.sum() / (avg_factor + eps)`, `none` ignores it
/// and `sum` is an error.
pub fn weight_reduce_loss(
    loss: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    avg_factor: Option<&AvgFactor>,
) -> Result<Tensor> {
    const NAME: &str = "weight_reduce_loss";
    crate::checks::readable(NAME, "loss", loss)?;
    check_avg_factor(NAME, reduction, avg_factor)?;
    let loss = match weight {
        Some(w) => loss
            .f_mul(crate::checks::real(NAME, "weight", w).map(|_| w)?)
            .with_context(|| {
                format!(
                    "weight of shape {:?} does not broadcast against the loss of shape {:?}",
                    w.size(),
                    loss.size()
                )
            })?,
        None => loss.shallow_clone(),
    };
    Ok(match (avg_factor, reduction) {
        (_, Reduction::None) => loss,
        (None, Reduction::Mean) => loss.f_mean(None)?,
        (None, Reduction::Sum) => loss.f_sum(None)?,
        (Some(_), Reduction::Sum) => bail!(SUM_WITH_AVG_FACTOR),
        (Some(AvgFactor::Value(v)), Reduction::Mean) => {
            loss.f_sum(None)?.f_div_scalar(v + AVG_FACTOR_EPS)?
        }
        (Some(AvgFactor::Tensor(t)), Reduction::Mean) => loss.f_sum(None)?.f_div(
            &t.f_to_device(loss.device())?
                .f_reshape([])?
                .f_add_scalar(AVG_FACTOR_EPS)?,
        )?,
    })
}
