//! The common interface of every loss: MMDetection's call
//! `loss(pred, target, weight=None, avg_factor=None, reduction_override=None)`.

use anyhow::Result;
use tch::Tensor;

use crate::reduction::{AvgFactor, Reduction};

/// A loss target, as MMDetection's losses accept it.
///
/// Most losses take one tensor (class indices or a dense target; the loss tells them apart by
/// their number of dimensions, as MMDetection does). QualityFocalLoss also takes a
/// `(labels, scores)` pair.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// One tensor: class indices `(N,)` or a dense target `(N, C)`.
    Tensor(&'a Tensor),
    /// QualityFocalLoss's `(labels (N,), scores (N,))`.
    LabelsScores {
        /// Class index per anchor; `C` (or anything outside `0..C`) is background.
        labels: &'a Tensor,
        /// IoU-quality score of each anchor's positive class.
        scores: &'a Tensor,
    },
}

impl<'a> From<&'a Tensor> for Target<'a> {
    fn from(t: &'a Tensor) -> Self {
        Target::Tensor(t)
    }
}

impl<'a> From<(&'a Tensor, &'a Tensor)> for Target<'a> {
    fn from((labels, scores): (&'a Tensor, &'a Tensor)) -> Self {
        Target::LabelsScores { labels, scores }
    }
}

/// The optional arguments of a loss call: `weight`, `avg_factor` and `reduction_override`.
///
/// ```
/// use tch_detloss::{LossArgs, Reduction};
/// let w = tch::Tensor::ones([8], (tch::Kind::Float, tch::Device::Cpu));
/// let args = LossArgs::new().weight(&w).avg_factor(4.0);
/// let sum = LossArgs::new().reduction(Reduction::Sum);
/// # let _ = (args, sum);
/// ```
#[derive(Clone, Debug, Default)]
pub struct LossArgs<'a> {
    /// Element weights (`label_weights`, `bbox_weights`), broadcast as the loss defines.
    pub weight: Option<&'a Tensor>,
    /// The divisor of `mean`.
    pub avg_factor: Option<AvgFactor>,
    /// Overrides the configured reduction for this call.
    pub reduction_override: Option<Reduction>,
    /// Overrides the configured `ignore_index` for this call (CrossEntropyLoss's call-time
    /// `ignore_index`); other losses reject it.
    pub ignore_index: Option<i64>,
    /// GaussianFocalLoss's `pos_inds` `(M,)`: the rows of the positives (with
    /// [`LossArgs::pos_labels`]); other losses reject it.
    pub pos_inds: Option<&'a Tensor>,
    /// GaussianFocalLoss's `pos_labels` `(M,)`: the class of each positive row.
    pub pos_labels: Option<&'a Tensor>,
    /// AssociativeEmbeddingLoss's `match`: per image, each object's corner cells
    /// `[[tl_y, tl_x], [br_y, br_x]]`; other losses reject it.
    pub corner_match: Option<&'a [crate::losses::ae::ImageMatch]>,
}

impl<'a> LossArgs<'a> {
    /// No weight, no `avg_factor`, the configured reduction.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the element weights.
    pub fn weight(mut self, weight: &'a Tensor) -> Self {
        self.weight = Some(weight);
        self
    }
    /// Sets `avg_factor`: a number or a 0-dim tensor.
    pub fn avg_factor(mut self, avg_factor: impl Into<AvgFactor>) -> Self {
        self.avg_factor = Some(avg_factor.into());
        self
    }
    /// Sets `reduction_override`.
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.reduction_override = Some(reduction);
        self
    }
    /// Sets GaussianFocalLoss's positives: their rows and classes.
    pub fn positives(mut self, pos_inds: &'a Tensor, pos_labels: &'a Tensor) -> Self {
        self.pos_inds = Some(pos_inds);
        self.pos_labels = Some(pos_labels);
        self
    }
    /// Sets AssociativeEmbeddingLoss's `match`: one list of corner pairs per image.
    pub fn corner_match(mut self, corner_match: &'a [crate::losses::ae::ImageMatch]) -> Self {
        self.corner_match = Some(corner_match);
        self
    }
    /// Sets the call-time `ignore_index`.
    pub fn ignore_index(mut self, ignore_index: i64) -> Self {
        self.ignore_index = Some(ignore_index);
        self
    }
}

/// A configured loss: what the registry builds from an MMDetection config dict.
///
/// ```
/// use tch_detloss::{losses::FocalLoss, Loss, LossArgs};
/// use tch::{Device, Kind, Tensor};
/// let pred = Tensor::randn([6, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 3, 1]); // 3 = background
/// let loss = FocalLoss::default().forward(&pred, (&labels).into(), &LossArgs::new().avg_factor(4.0))?;
/// loss.backward();
/// # anyhow::Ok(())
/// ```
pub trait Loss: Send + Sync + std::fmt::Debug {
    /// The MMDetection class name (the config's `type`).
    fn type_name(&self) -> &str;

    /// The loss, computed by the fused kernels where the loss has them.
    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor>;

    /// The same loss composed from stock tch ops, op for op as MMDetection writes it: the
    /// reference and the baseline to profile against. Required: a loss without one could not
    /// be checked or profiled (a loss that is only ever composed of stock ops returns the same
    /// as [`Loss::forward`]).
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor>;

    /// The loss as MMDetection returns it where that is a dict (SeesawLoss's
    /// `loss_cls_objectness` and `loss_cls_classes`): named parts whose sum is
    /// [`Loss::forward`]. One part named `loss` for the others.
    fn forward_parts(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(
            "loss".to_string(),
            self.forward(pred, target, args)?,
        )])
    }

    /// MMDetection's `get_activation(cls_score)` of a loss with a custom activation (its
    /// `custom_activation`): the scores a head reports at test time. None for the others, whose
    /// head applies its usual sigmoid or softmax.
    fn get_activation(&self, cls_score: &Tensor) -> Result<Option<Tensor>> {
        let _ = cls_score;
        Ok(None)
    }

    /// The state the loss keeps between calls (GHM's momentum `acc_sum`), by name, as copies:
    /// what a checkpoint saves. Empty for stateless losses.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// Restores one entry of [`Loss::state`] from a checkpoint.
    fn load_state(&self, name: &str, value: &Tensor) -> Result<()> {
        let _ = value;
        anyhow::bail!("{}: no state named {name:?}", self.type_name())
    }
}
