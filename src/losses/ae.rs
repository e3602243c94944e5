//! mmdet/models/losses/ae_loss.py: [`AssociativeEmbeddingLoss`], CornerNet's grouping of
//! corners into objects.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{single_target, sum_in_order, sum_times_zero};
use crate::{LossArgs, Target};

pub(crate) const NAME: &str = "AssociativeEmbeddingLoss";

/// One image's `match`: each object's top-left and bottom-right corner cells,
/// `[[tl_y, tl_x], [br_y, br_x]]` (row first), as CornerNet's head writes them.
pub type ImageMatch = Vec<[[i64; 2]; 2]>;

/// MMDetection's `AssociativeEmbeddingLoss`: `pred` holds the top-left corner embeddings
/// `(B, D, H, W)` and the target the bottom-right ones (same shape); the call's
/// [`LossArgs::corner_match`] gives, per image, the corner cells of each object.
///
/// Per image, the embeddings at those cells are flattened to `N = objects × D` values (so with
/// `D > 1` every component counts as an object of its own, as in MMDetection), `me` is the mean
/// of each pair, and
/// * pull = `sum((tl - me)² + (br - me)²) / N`,
/// * push = `sum_{i≠j} relu(1 - |me_i - me_j|) / (N (N - 1))`, 0 for `N == 1`;
///
/// an image without objects gives 0 for both, with a zero gradient. The loss is
/// `pull_weight · Σ pull + push_weight · Σ push` over the batch (summed, not averaged), which
/// [`Loss::forward_parts`](crate::Loss::forward_parts) gives as MMDetection's tuple,
/// `pull_loss` and `push_loss`. The call takes no weight, `avg_factor` or reduction (MMDetection's
/// takes none). An empty batch gives zeros, where MMDetection returns two Python zeros; corner
/// cells outside the map, negative ones included, and a match of another length than the batch
/// are errors.
///
/// Composed of stock ops: its terms are gathers at a few cells and a pairwise matrix per image,
/// neither an element, row, histogram nor box shape.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{losses::ae::ImageMatch, registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "AssociativeEmbeddingLoss"}"#)?;
/// let tl = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let br = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
/// let matches: Vec<ImageMatch> = vec![vec![[[0, 1], [3, 5]], [[2, 2], [7, 6]]], vec![]];
/// let parts = loss.forward_parts(&tl, (&br).into(), &LossArgs::new().corner_match(&matches))?;
/// assert_eq!(parts[0].0, "pull_loss");
/// loss.forward(&tl, (&br).into(), &LossArgs::new().corner_match(&matches))?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssociativeEmbeddingLoss {
    /// Multiplies each image's pull loss.
    pub pull_weight: f64,
    /// Multiplies each image's push loss.
    pub push_weight: f64,
}

impl Default for AssociativeEmbeddingLoss {
    fn default() -> Self {
        Self {
            pull_weight: 0.25,
            push_weight: 0.25,
        }
    }
}

impl AssociativeEmbeddingLoss {
    /// MMDetection's constructor checks (there are none).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// `(pull, push)` over the batch, each image as `ae_loss_per_image`, accumulated in
    /// MMDetection's order.
    fn parts(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let target = single_target(NAME, target)?;
        super::takes_no_call_args(NAME, args, "forward(pred, target, match)")?;
        crate::checks::floating(NAME, "pred", pred)?;
        crate::checks::floating(NAME, "target", target)?;
        ensure!(
            pred.dim() == 4,
            "{NAME}: pred must be top-left embeddings (B, D, H, W), got shape {:?}",
            pred.size()
        );
        ensure!(
            target.size() == pred.size() && target.kind() == pred.kind(),
            "{NAME}: target must be bottom-right embeddings of pred's shape {:?} and dtype {:?}, got {:?} {:?}",
            pred.size(),
            pred.kind(),
            target.size(),
            target.kind()
        );
        ensure!(
            target.device() == pred.device(),
            "{NAME}: target is on {:?}, pred on {:?}",
            target.device(),
            pred.device()
        );
        let (b, h, w) = (pred.size()[0], pred.size()[2], pred.size()[3]);
        let Some(matches) = args.corner_match else {
            bail!("{NAME}: the call needs corner_match (MMDetection's match), one list per image");
        };
        ensure!(
            matches.len() as i64 == b,
            "{NAME}: corner_match has {} images, pred {b}",
            matches.len()
        );
        let (mut pulls, mut pushes) = (Vec::new(), Vec::new());
        for (i, m) in matches.iter().enumerate() {
            for (k, [[ty, tx], [by, bx]]) in m.iter().enumerate() {
                for (what, y, x) in [("top-left", ty, tx), ("bottom-right", by, bx)] {
                    ensure!(
                        (0..h).contains(y) && (0..w).contains(x),
                        "{NAME}: image {i} object {k}: {what} corner ({y}, {x}) is outside the {h}×{w} map"
                    );
                }
            }
            let (pull, push) = per_image(
                &pred.f_select(0, i as i64)?,
                &target.f_select(0, i as i64)?,
                m,
            )?;
            pulls.push(pull.f_mul_scalar(self.pull_weight)?);
            pushes.push(push.f_mul_scalar(self.push_weight)?);
        }
        match (sum_in_order(pulls)?, sum_in_order(pushes)?) {
            (Some(pull), Some(push)) => Ok((pull, push)),
            // An empty batch.
            _ => Ok((sum_times_zero(pred)?, sum_times_zero(pred)?)),
        }
    }

    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let (pull, push) = self.parts(pred, target, args)?;
        Ok(pull.f_add(&push)?)
    }
}

/// `ae_loss_per_image`: one image's `(pull, push)` from its embeddings `(D, H, W)`.
fn per_image(tl: &Tensor, br: &Tensor, m: &ImageMatch) -> Result<(Tensor, Tensor)> {
    if m.is_empty() {
        return Ok((sum_times_zero(tl)?, sum_times_zero(tl)?));
    }
    let cells = |pick: fn(&[[i64; 2]; 2]) -> [i64; 2]| -> Result<(Tensor, Tensor)> {
        let (ys, xs): (Vec<i64>, Vec<i64>) = m.iter().map(|c| (pick(c)[0], pick(c)[1])).unzip();
        Ok((
            Tensor::from_slice(&ys).f_to_device(tl.device())?,
            Tensor::from_slice(&xs).f_to_device(tl.device())?,
        ))
    };
    // `preds[:, y, x].view(-1, 1)` per object, concatenated: object-major, then the D
    // components.
    let gather = |t: &Tensor, (ys, xs): (Tensor, Tensor)| -> Result<Tensor> {
        Ok(t.f_index(&[None, Some(ys), Some(xs)])?
            .f_transpose(0, 1)?
            .f_reshape([-1, 1])?)
    };
    let tl_e = gather(tl, cells(|c| c[0])?)?;
    let br_e = gather(br, cells(|c| c[1])?)?;
    let me = tl_e.f_add(&br_e)?.f_div_scalar(2.0)?;
    let n = tl_e.size()[0];
    let pull = tl_e
        .f_sub(&me)?
        .f_pow_tensor_scalar(2)?
        .f_add(&br_e.f_sub(&me)?.f_pow_tensor_scalar(2)?)?
        .f_sum(None::<Kind>)?
        .f_div_scalar(n as f64)?;
    if n == 1 {
        return Ok((pull, sum_times_zero(tl)?));
    }
    let conf = me
        .f_expand([n, n, 1], false)?
        .f_permute([1, 0, 2])?
        .f_sub(&me)?;
    let conf_weight = Tensor::f_eye(n, (me.kind(), me.device()))?
        .f_neg()?
        .f_add_scalar(1.0)?;
    let conf = conf_weight.f_mul(
        &conf
            .f_sum_dim_intlist(-1, false, None::<Kind>)?
            .f_abs()?
            .f_neg()?
            .f_add_scalar(1.0)?,
    )?;
    let push = conf
        .f_relu()?
        .f_sum(None::<Kind>)?
        .f_div_scalar((n * (n - 1)) as f64)?;
    Ok((pull, push))
}

super::composed_loss!(AssociativeEmbeddingLoss, NAME, {
    fn forward_parts(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Vec<(String, Tensor)>> {
        let (pull, push) = self.parts(pred, target, args)?;
        Ok(vec![("pull_loss".into(), pull), ("push_loss".into(), push)])
    }
});
