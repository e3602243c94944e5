//! mmdet/models/losses/iou_loss.py: [`IoULoss`], [`GIoULoss`], [`DIoULoss`], [`CIoULoss`],
//! [`EIoULoss`] and [`SIoULoss`] on the box executor, a thread per box pair (kernel bodies
//! `kernels/iou.cuh`, `giou.cuh`, `diou.cuh`, `ciou.cuh`, `eiou.cuh`, `siou.cuh`, over the dual
//! numbers of `kernels/box.cuh`).

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{begin, shortcut, single_target};
use crate::checks::broadcast_shapes;
use crate::fused::{self, Body, KTarget, Shape, Spec};
use crate::reduction::{weight_reduce_loss, Reduction};
use crate::{Loss, LossArgs, Target};

/// What the four classes share: xyxy boxes `(N, 4)`, a loss per box (`(N,)` for 'none'), a weight
/// per box `(N,)` or per coordinate `(N, 4)` (averaged over the box, as MMDetection's
/// `weight.mean(-1)`), and MMDetection's zero-weight short-cut.
struct BoxCall {
    name: &'static str,
    body: Body,
    /// The body's slots p0 (eps), p1 (EIoU's smooth point) and i0 (IoULoss's mode, SIoU's
    /// neg_gamma).
    eps: f64,
    p1: f64,
    mode: i64,
    /// IoULoss skips the short-cut for reduction 'none'; the others take it whatever the reduction.
    shortcut_for_none: bool,
    reduction: Reduction,
    loss_weight: f64,
}

impl BoxCall {
    fn start<'a>(
        &self,
        pred: &Tensor,
        target: Target<'a>,
        args: &LossArgs<'_>,
    ) -> Result<(&'a Tensor, Reduction)> {
        let reduction = begin(self.name, pred, target, args, self.reduction)?;
        let t = single_target(self.name, target)?;
        ensure!(
            pred.dim() == 2 && pred.size()[1] == 4,
            "{}: pred must be (N, 4) boxes (x1, y1, x2, y2), got shape {:?}",
            self.name,
            pred.size()
        );
        ensure!(
            t.size() == pred.size(),
            "{}: target must have pred's shape {:?}, got {:?}",
            self.name,
            pred.size(),
            t.size()
        );
        Ok((t, reduction))
    }

    /// Whether the loss takes the weight: `(N, 4)` exactly (MMDetection asserts
    /// `weight.shape == pred.shape` before its `mean(-1)`), or one that broadcasts against the
    /// loss `(N,)` without growing it.
    fn weight_ok(&self, pred: &Tensor, w: &Tensor) -> Result<()> {
        if w.dim() > 1 {
            ensure!(
                w.size() == pred.size(),
                "{}: a weight with more than one dimension must have pred's shape {:?}, got {:?}",
                self.name,
                pred.size(),
                w.size()
            );
            return Ok(());
        }
        let n = pred.size()[0];
        let out = broadcast_shapes(&[n], &w.size())
            .map_err(|e| anyhow::anyhow!("{}: weight of shape {:?}: {e}", self.name, w.size()))?;
        if out != [n] {
            bail!(
                "{}: weight of shape {:?} does not broadcast against the loss of shape [{n}]",
                self.name,
                w.size()
            );
        }
        Ok(())
    }

    fn spec(&self, reduction: Reduction) -> Spec {
        let mut spec = Spec::new(
            self.body,
            self.name,
            Shape::Box,
            reduction,
            self.loss_weight,
        );
        spec.params = [self.eps, self.p1, 0.0, 0.0];
        spec.int_param = self.mode;
        spec
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let (t, reduction) = self.start(pred, target, args)?;
        let takes_shortcut = reduction != Reduction::None || self.shortcut_for_none;
        let normal = args.weight.map_or(Ok(()), |w| self.weight_ok(pred, w));
        let plan = if takes_shortcut {
            shortcut::plan(pred, args.weight, reduction, self.shortcut_for_none, normal)?
        } else {
            normal?;
            shortcut::Plan::Fused
        };
        match plan {
            shortcut::Plan::Fused => {
                let mut spec = self.spec(reduction);
                spec.shortcut = takes_shortcut;
                // Per box as the (N, 1) column the kernels take; (N, 4) per coordinate as it is.
                let weight = match args.weight {
                    Some(w) if w.dim() <= 1 => {
                        Some(super::row_weight(self.name, w, pred.size()[0])?)
                    }
                    Some(w) => Some(w.shallow_clone()),
                    None => None,
                };
                fused::run(
                    spec,
                    pred,
                    KTarget::Dense(t),
                    weight.as_ref(),
                    args.avg_factor.as_ref(),
                )
            }
            shortcut::Plan::Taken(view) => {
                let mut spec = self.spec(Reduction::Sum);
                spec.shortcut = true;
                // As (N, 1) or (N, 4) for the box executor.
                let (n, c) = (pred.size()[0], pred.size()[1]);
                let per_coordinate = view.dim() == 2 && view.size() == [n, c];
                let per_box = broadcast_shapes(&[n, 1], &view.size()).is_ok_and(|s| s == [n, 1]);
                let view = if per_coordinate || per_box {
                    view
                } else {
                    broadcast_shapes(&[n, c], &view.size())?;
                    view.f_expand([n, c], false)?.f_contiguous()?
                };
                fused::run(spec, pred, KTarget::Dense(t), Some(&view), None)
            }
        }
    }

    /// The class's `forward` in stock ops around `elem`, the loss function of `(pred, target)`.
    fn unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
        elem: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (t, reduction) = self.start(pred, target, args)?;
        if let Some(w) = args.weight {
            if (reduction != Reduction::None || self.shortcut_for_none) && shortcut::no_positive(w)?
            {
                return shortcut::unfused(pred, w);
            }
            self.weight_ok(pred, w)?;
        }
        let weight = match args.weight {
            Some(w) if w.dim() > 1 => Some(w.f_mean_dim(-1, false, None::<Kind>)?),
            Some(w) => Some(w.shallow_clone()),
            None => None,
        };
        let loss = elem(pred, &t.f_type_as(pred)?)?;
        Ok(
            weight_reduce_loss(&loss, weight.as_ref(), reduction, args.avg_factor.as_ref())?
                * self.loss_weight,
        )
    }
}

/// The columns of `(N, 4)` boxes.
fn cols(b: &Tensor) -> Result<[Tensor; 4]> {
    Ok([
        b.f_select(1, 0)?,
        b.f_select(1, 1)?,
        b.f_select(1, 2)?,
        b.f_select(1, 3)?,
    ])
}

/// MMDetection's `bbox_overlaps(pred, target, mode, is_aligned=True, eps)` for mode 'iou' or
/// 'giou', in stock ops.
pub(crate) fn bbox_overlaps_aligned(
    b1: &Tensor,
    b2: &Tensor,
    giou: bool,
    eps: f64,
) -> Result<Tensor> {
    if b1.size()[0] == 0 {
        // MMDetection returns an unconnected `bboxes1.new((0,))`; this empty one keeps the graph.
        return Ok(b1.f_select(1, 0)?.f_mul_scalar(0.0)?);
    }
    let [x1, y1, x2, y2] = cols(b1)?;
    let [u1, v1, u2, v2] = cols(b2)?;
    let area1 = x2.f_sub(&x1)?.f_mul(&y2.f_sub(&y1)?)?;
    let area2 = u2.f_sub(&u1)?.f_mul(&v2.f_sub(&v1)?)?;
    let lt = b1.f_narrow(1, 0, 2)?.f_maximum(&b2.f_narrow(1, 0, 2)?)?;
    let rb = b1.f_narrow(1, 2, 2)?.f_minimum(&b2.f_narrow(1, 2, 2)?)?;
    let wh = rb.f_sub(&lt)?.f_clamp_min(0.0)?;
    let overlap = wh.f_select(1, 0)?.f_mul(&wh.f_select(1, 1)?)?;
    let union = area1.f_add(&area2)?.f_sub(&overlap)?;
    let eps_t = Tensor::f_from_slice(&[eps])?
        .f_to_kind(union.kind())?
        .f_to_device(union.device())?;
    let union = union.f_maximum(&eps_t)?;
    let ious = overlap.f_div(&union)?;
    if !giou {
        return Ok(ious);
    }
    let elt = b1.f_narrow(1, 0, 2)?.f_minimum(&b2.f_narrow(1, 0, 2)?)?;
    let erb = b1.f_narrow(1, 2, 2)?.f_maximum(&b2.f_narrow(1, 2, 2)?)?;
    let ewh = erb.f_sub(&elt)?.f_clamp_min(0.0)?;
    let enclose = ewh.f_select(1, 0)?.f_mul(&ewh.f_select(1, 1)?)?;
    let enclose = enclose.f_maximum(&eps_t)?;
    Ok(ious.f_sub(&enclose.f_sub(&union)?.f_div(&enclose)?)?)
}

/// `iou_loss` / `giou_loss`'s float16 handling: computed in float32, the IoU back in float16.
fn in_f32(pred: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if pred.kind() == Kind::Half {
        Ok(f(&pred.f_to_kind(Kind::Float)?)?.f_to_kind(Kind::Half)?)
    } else {
        f(pred)
    }
}

/// What DIoU, CIoU and SIoU share: the aligned IoU, `eps` added to the union, and the enclosing
/// box's `(w, h)` `(N, 2)`, clamped at `enclose_min`.
fn iou_and_enclosure(
    pred: &Tensor,
    target: &Tensor,
    eps: f64,
    enclose_min: f64,
) -> Result<(Tensor, Tensor)> {
    let lt = pred
        .f_narrow(1, 0, 2)?
        .f_maximum(&target.f_narrow(1, 0, 2)?)?;
    let rb = pred
        .f_narrow(1, 2, 2)?
        .f_minimum(&target.f_narrow(1, 2, 2)?)?;
    let wh = rb.f_sub(&lt)?.f_clamp_min(0.0)?;
    let overlap = wh.f_select(1, 0)?.f_mul(&wh.f_select(1, 1)?)?;
    let [x1, y1, x2, y2] = cols(pred)?;
    let [u1, v1, u2, v2] = cols(target)?;
    let ap = x2.f_sub(&x1)?.f_mul(&y2.f_sub(&y1)?)?;
    let ag = u2.f_sub(&u1)?.f_mul(&v2.f_sub(&v1)?)?;
    let union = ap.f_add(&ag)?.f_sub(&overlap)?.f_add_scalar(eps)?;
    let ious = overlap.f_div(&union)?;
    let elt = pred
        .f_narrow(1, 0, 2)?
        .f_minimum(&target.f_narrow(1, 0, 2)?)?;
    let erb = pred
        .f_narrow(1, 2, 2)?
        .f_maximum(&target.f_narrow(1, 2, 2)?)?;
    Ok((ious, erb.f_sub(&elt)?.f_clamp_min(enclose_min)?))
}

/// The terms DIoU and CIoU share: (IoU, rho^2 / c^2).
fn diou_terms(pred: &Tensor, target: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (ious, ewh) = iou_and_enclosure(pred, target, eps, 0.0)?;
    let [x1, y1, x2, y2] = cols(pred)?;
    let [u1, v1, u2, v2] = cols(target)?;
    let cw = ewh.f_select(1, 0)?;
    let ch = ewh.f_select(1, 1)?;
    let c2 = cw
        .f_pow_tensor_scalar(2)?
        .f_add(&ch.f_pow_tensor_scalar(2)?)?
        .f_add_scalar(eps)?;
    let left = u1
        .f_add(&u2)?
        .f_sub(&x1.f_add(&x2)?)?
        .f_pow_tensor_scalar(2)?
        .f_div_scalar(4)?;
    let right = v1
        .f_add(&v2)?
        .f_sub(&y1.f_add(&y2)?)?
        .f_pow_tensor_scalar(2)?
        .f_div_scalar(4)?;
    let rho2 = left.f_add(&right)?;
    Ok((ious, rho2.f_div(&c2)?))
}

macro_rules! eps_loss_common {
    ($ty:ident) => {
        impl Default for $ty {
            fn default() -> Self {
                Self {
                    eps: 1e-6,
                    reduction: Reduction::Mean,
                    loss_weight: 1.0,
                }
            }
        }
    };
}

/// MMDetection's `IoULoss`: `1 - iou` (linear), `1 - iou^2` (square) or `-ln(iou)` (log) of the
/// aligned IoU of xyxy boxes `(N, 4)`, the IoU clamped at `eps` (no gradient below it). 'none'
/// gives `(N,)`; the weight is `(N,)` or `(N, 4)` (averaged over each box).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "IoULoss", "mode": "linear"}"#)?;
/// let pred = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 2.0, 1.0, 1.0, 3.0, 4.0]).view([2, 4]).set_requires_grad(true);
/// let target = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 1.0, 1.0, 1.0, 3.0, 3.0]).view([2, 4]);
/// loss.forward(&pred, (&target).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoULoss {
    /// Deprecated in MMDetection: `true` means `mode = "linear"`.
    pub linear: bool,
    /// The lower clamp of the IoU.
    pub eps: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// "linear", "square" or "log".
    pub mode: String,
}

impl Default for IoULoss {
    fn default() -> Self {
        Self {
            linear: false,
            eps: 1e-6,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
            mode: "log".into(),
        }
    }
}

impl IoULoss {
    /// MMDetection's `assert mode in ['linear', 'square', 'log']`.
    pub fn validate(&self) -> Result<()> {
        self.mode_code().map(|_| ())
    }

    /// The kernel's mode slot: 0 linear, 1 square, 2 log.
    fn mode_code(&self) -> Result<i64> {
        let code = match self.mode.as_str() {
            "linear" => 0,
            "square" => 1,
            "log" => 2,
            m => bail!("IoULoss: mode must be \"linear\", \"square\" or \"log\", got {m:?}"),
        };
        Ok(if self.linear { 0 } else { code })
    }

    fn call(&self) -> Result<BoxCall> {
        Ok(BoxCall {
            name: "IoULoss",
            body: Body::Iou,
            eps: self.eps,
            p1: 0.0,
            mode: self.mode_code()?,
            shortcut_for_none: false,
            reduction: self.reduction,
            loss_weight: self.loss_weight,
        })
    }
}

impl Loss for IoULoss {
    fn type_name(&self) -> &str {
        "IoULoss"
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        self.call()?.forward(pred, target, args)
    }

    /// `iou_loss` in stock ops.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        let call = self.call()?;
        let (eps, mode) = (self.eps, call.mode);
        call.unfused(pred, target, args, |p, t| {
            let ious = in_f32(p, |p| {
                bbox_overlaps_aligned(p, &t.f_type_as(p)?, false, 1e-6)?
                    .f_clamp_min(eps)
                    .map_err(Into::into)
            })?;
            Ok(match mode {
                0 => ious.f_neg()?.f_add_scalar(1.0)?,
                1 => ious.f_pow_tensor_scalar(2)?.f_neg()?.f_add_scalar(1.0)?,
                _ => ious.f_log()?.f_neg()?,
            })
        })
    }
}

/// MMDetection's `GIoULoss`: `1 - GIoU` of xyxy boxes `(N, 4)`, the union and the enclosing area
/// clamped at `eps`. 'none' gives `(N,)`; the weight is `(N,)` or `(N, 4)`.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "GIoULoss", "loss_weight": 2.0}"#)?;
/// let pred = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 2.0, 1.0, 1.0, 3.0, 4.0]).view([2, 4]).set_requires_grad(true);
/// let target = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 1.0, 5.0, 5.0, 6.0, 6.0]).view([2, 4]);
/// let w = Tensor::from_slice(&[1.0f32, 0.0]); // the second box contributes nothing
/// loss.forward(&pred, (&target).into(), &LossArgs::new().weight(&w).avg_factor(1.0))?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GIoULoss {
    /// The lower clamp of the union and of the enclosing area.
    pub eps: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}
eps_loss_common!(GIoULoss);

/// MMDetection's `DIoULoss`: `1 - (IoU - rho^2 / c^2)` of xyxy boxes `(N, 4)`, with `eps` added to
/// the union and to `c^2`. 'none' gives `(N,)`; the weight is `(N,)` or `(N, 4)`.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "DIoULoss"}"#)?;
/// let pred = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 2.0]).view([1, 4]).set_requires_grad(true);
/// let target = Tensor::from_slice(&[1.0f32, 0.0, 3.0, 2.0]).view([1, 4]);
/// loss.forward(&pred, (&target).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DIoULoss {
    /// Added to the union and to the squared enclosing diagonal.
    pub eps: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}
eps_loss_common!(DIoULoss);

/// MMDetection's `CIoULoss`: `1 - clamp(IoU - (rho^2 / c^2 + alpha v), -1, 1)` of xyxy boxes
/// `(N, 4)`, with the aspect-ratio term `v` and `alpha` a constant (no gradient), as MMDetection
/// computes it. 'none' gives `(N,)`; the weight is `(N,)` or `(N, 4)`.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "CIoULoss"}"#)?;
/// let pred = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 2.0]).view([1, 4]).set_requires_grad(true);
/// let target = Tensor::from_slice(&[0.5f32, 0.0, 2.5, 3.0]).view([1, 4]);
/// loss.forward(&pred, (&target).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CIoULoss {
    /// Added to the union, to the squared enclosing diagonal and to both heights.
    pub eps: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}
eps_loss_common!(CIoULoss);

macro_rules! eps_loss {
    ($ty:ident, $name:literal, $body:expr, $slots:expr, $unfused:expr) => {
        impl $ty {
            /// MMDetection's constructor checks (there are none).
            pub fn validate(&self) -> Result<()> {
                Ok(())
            }

            fn call(&self) -> BoxCall {
                let (p1, mode): (f64, i64) = $slots(self);
                BoxCall {
                    name: $name,
                    body: $body,
                    eps: self.eps,
                    p1,
                    mode,
                    shortcut_for_none: true,
                    reduction: self.reduction,
                    loss_weight: self.loss_weight,
                }
            }
        }

        impl Loss for $ty {
            fn type_name(&self) -> &str {
                $name
            }

            fn forward(
                &self,
                pred: &Tensor,
                target: Target<'_>,
                args: &LossArgs<'_>,
            ) -> Result<Tensor> {
                self.call().forward(pred, target, args)
            }

            /// The loss function in stock ops, op for op as MMDetection writes it.
            fn forward_unfused(
                &self,
                pred: &Tensor,
                target: Target<'_>,
                args: &LossArgs<'_>,
            ) -> Result<Tensor> {
                self.call()
                    .unfused(pred, target, args, |p, t| $unfused(p, t, self))
            }
        }
    };
}

eps_loss!(
    GIoULoss,
    "GIoULoss",
    Body::Giou,
    |_: &GIoULoss| (0.0, 0),
    |p: &Tensor, t: &Tensor, s: &GIoULoss| {
        let gious = in_f32(p, |p| {
            bbox_overlaps_aligned(p, &t.f_type_as(p)?, true, s.eps)
        })?;
        Ok::<_, anyhow::Error>(gious.f_neg()?.f_add_scalar(1.0)?)
    }
);
eps_loss!(
    DIoULoss,
    "DIoULoss",
    Body::Diou,
    |_: &DIoULoss| (0.0, 0),
    |p: &Tensor, t: &Tensor, s: &DIoULoss| {
        let (ious, dist) = diou_terms(p, t, s.eps)?;
        Ok::<_, anyhow::Error>(ious.f_sub(&dist)?.f_neg()?.f_add_scalar(1.0)?)
    }
);
eps_loss!(
    CIoULoss,
    "CIoULoss",
    Body::Ciou,
    |_: &CIoULoss| (0.0, 0),
    |p: &Tensor, t: &Tensor, s: &CIoULoss| {
        let eps = s.eps;
        let (ious, dist) = diou_terms(p, t, eps)?;
        let [x1, y1, x2, y2] = cols(p)?;
        let [u1, v1, u2, v2] = cols(t)?;
        let (w1, h1) = (x2.f_sub(&x1)?, y2.f_sub(&y1)?.f_add_scalar(eps)?);
        let (w2, h2) = (u2.f_sub(&u1)?, v2.f_sub(&v1)?.f_add_scalar(eps)?);
        let factor = 4.0 / (std::f64::consts::PI * std::f64::consts::PI);
        let v = w2
            .f_div(&h2)?
            .f_atan()?
            .f_sub(&w1.f_div(&h1)?.f_atan()?)?
            .f_pow_tensor_scalar(2)?
            .f_mul_scalar(factor)?;
        let alpha = {
            let _guard = tch::no_grad_guard();
            let (iv, vv) = (ious.f_detach()?, v.f_detach()?);
            iv.f_gt(0.5)?
                .f_to_kind(Kind::Float)?
                .f_mul(&vv)?
                .f_div(&iv.f_neg()?.f_add_scalar(1.0)?.f_add(&vv)?)?
        };
        let cious = ious.f_sub(&dist.f_add(&alpha.f_mul(&v)?)?)?;
        Ok::<_, anyhow::Error>(cious.f_clamp(-1.0, 1.0)?.f_neg()?.f_add_scalar(1.0)?)
    }
);

/// MMDetection's `EIoULoss` (from libfacedetection): the smooth loss of `u = 1 - I / union`,
/// `0.5 u^2 / smooth_point` below `smooth_point` and `u - 0.5 smooth_point` above, where `I` is
/// libfacedetection's intersection (the true one for overlapping boxes, negative without a clamp
/// for disjoint ones) and `eps` is added to the union. 'none' gives `(N,)`; the weight is `(N,)`
/// or exactly `(N, 4)` (averaged over each box).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "EIoULoss", "smooth_point": 0.1}"#)?;
/// let pred = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 2.0]).view([1, 4]).set_requires_grad(true);
/// let target = Tensor::from_slice(&[1.0f32, 0.0, 3.0, 2.0]).view([1, 4]);
/// loss.forward(&pred, (&target).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EIoULoss {
    /// Added to the union.
    pub eps: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// Where the loss turns from quadratic to linear in `u`.
    pub smooth_point: f64,
}

impl Default for EIoULoss {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
            smooth_point: 0.1,
        }
    }
}

/// MMDetection's `SIoULoss` (from YOLOv6): `1 - clamp(IoU - 0.5 (distance + shape), -1, 1)` with
/// the angle-dependent distance cost and the shape cost of the SIoU paper, `eps` added where
/// MMDetection adds it. With the default `neg_gamma = false` the distance cost's exponent is
/// positive (MMDetection's choice, more stable than the paper's, which `neg_gamma = true` gives).
/// 'none' gives `(N,)`; the weight is `(N,)` or exactly `(N, 4)`.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "SIoULoss", "neg_gamma": true}"#)?;
/// let pred = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 2.0]).view([1, 4]).set_requires_grad(true);
/// let target = Tensor::from_slice(&[1.0f32, 0.5, 3.0, 2.5]).view([1, 4]);
/// loss.forward(&pred, (&target).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SIoULoss {
    /// Added to the union, the centre offsets and the heights; the enclosing extents' lower clamp.
    pub eps: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// The paper's negative exponent in the distance cost.
    pub neg_gamma: bool,
}

impl Default for SIoULoss {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
            neg_gamma: false,
        }
    }
}

eps_loss!(
    EIoULoss,
    "EIoULoss",
    Body::Eiou,
    |s: &EIoULoss| (s.smooth_point, 0),
    |p: &Tensor, t: &Tensor, s: &EIoULoss| eiou_loss(p, t, s.smooth_point, s.eps)
);
eps_loss!(
    SIoULoss,
    "SIoULoss",
    Body::Siou,
    |s: &SIoULoss| (0.0, i64::from(s.neg_gamma)),
    |p: &Tensor, t: &Tensor, s: &SIoULoss| siou_loss(p, t, s.eps, s.neg_gamma)
);

/// `eiou_loss` in stock ops, op for op.
fn eiou_loss(pred: &Tensor, target: &Tensor, smooth_point: f64, eps: f64) -> Result<Tensor> {
    let [px1, py1, px2, py2] = cols(pred)?;
    let [tx1, ty1, tx2, ty2] = cols(target)?;
    let (ex1, ey1) = (px1.f_minimum(&tx1)?, py1.f_minimum(&ty1)?);
    let (ix1, iy1) = (px1.f_maximum(&tx1)?, py1.f_maximum(&ty1)?);
    let (ix2, iy2) = (px2.f_minimum(&tx2)?, py2.f_minimum(&ty2)?);
    let (xmin, ymin) = (ix1.f_minimum(&ix2)?, iy1.f_minimum(&iy2)?);
    let (xmax, ymax) = (ix1.f_maximum(&ix2)?, iy1.f_maximum(&iy2)?);
    let term =
        |a: &Tensor, b: &Tensor| -> Result<Tensor> { Ok(a.f_sub(&ex1)?.f_mul(&b.f_sub(&ey1)?)?) };
    let intersection = term(&ix2, &iy2)?
        .f_add(&term(&xmin, &ymin)?)?
        .f_sub(&term(&ix1, &ymax)?)?
        .f_sub(&term(&xmax, &iy1)?)?;
    let union = px2
        .f_sub(&px1)?
        .f_mul(&py2.f_sub(&py1)?)?
        .f_add(&tx2.f_sub(&tx1)?.f_mul(&ty2.f_sub(&ty1)?)?)?
        .f_sub(&intersection)?
        .f_add_scalar(eps)?;
    let ious = intersection.f_div(&union)?.f_neg()?.f_add_scalar(1.0)?;
    let sign = ious
        .f_lt(smooth_point)?
        .f_detach()?
        .f_to_kind(Kind::Float)?;
    let quadratic = sign
        .f_mul_scalar(0.5)?
        .f_mul(&ious.f_pow_tensor_scalar(2)?)?
        .f_div_scalar(smooth_point)?;
    let linear = sign
        .f_neg()?
        .f_add_scalar(1.0)?
        .f_mul(&ious.f_sub_scalar(0.5 * smooth_point)?)?;
    Ok(quadratic.f_add(&linear)?)
}

/// `siou_loss` in stock ops, op for op.
fn siou_loss(pred: &Tensor, target: &Tensor, eps: f64, neg_gamma: bool) -> Result<Tensor> {
    // The enclosing extents clamped at eps (MMDetection: "to avoid NaN").
    let (ious, enclose_wh) = iou_and_enclosure(pred, target, eps, eps)?;
    let [b1x1, b1y1, b1x2, b1y2] = cols(pred)?;
    let [b2x1, b2y1, b2x2, b2y2] = cols(target)?;
    let (cw, ch) = (enclose_wh.f_select(1, 0)?, enclose_wh.f_select(1, 1)?);
    let (w1, h1) = (b1x2.f_sub(&b1x1)?, b1y2.f_sub(&b1y1)?.f_add_scalar(eps)?);
    let (w2, h2) = (b2x2.f_sub(&b2x1)?, b2y2.f_sub(&b2y1)?.f_add_scalar(eps)?);
    let offset = |a1: &Tensor, a2: &Tensor, c1: &Tensor, c2: &Tensor| -> Result<Tensor> {
        Ok(a1
            .f_add(a2)?
            .f_sub(c1)?
            .f_sub(c2)?
            .f_mul_scalar(0.5)?
            .f_add_scalar(eps)?)
    };
    let s_cw = offset(&b2x1, &b2x2, &b1x1, &b1x2)?;
    let s_ch = offset(&b2y1, &b2y2, &b1y1, &b1y2)?;
    let sigma = s_cw
        .f_pow_tensor_scalar(2)?
        .f_add(&s_ch.f_pow_tensor_scalar(2)?)?
        .f_pow_tensor_scalar(0.5)?;
    let sin1 = s_cw.f_abs()?.f_div(&sigma)?;
    let sin2 = s_ch.f_abs()?.f_div(&sigma)?;
    let threshold = 2f64.powf(0.5) / 2.0;
    let sin_alpha = sin2.f_where_self(&sin1.f_gt(threshold)?, &sin1)?;
    let angle = sin_alpha
        .f_asin()?
        .f_mul_scalar(2.0)?
        .f_sub_scalar(std::f64::consts::PI / 2.0)?
        .f_cos()?;
    let rho_x = s_cw.f_div(&cw)?.f_pow_tensor_scalar(2)?;
    let rho_y = s_ch.f_div(&ch)?.f_pow_tensor_scalar(2)?;
    let gamma = if neg_gamma {
        angle.f_sub_scalar(2.0)?
    } else {
        angle.f_neg()?.f_add_scalar(2.0)?
    };
    let distance = gamma
        .f_mul(&rho_x)?
        .f_exp()?
        .f_neg()?
        .f_add_scalar(2.0)?
        .f_sub(&gamma.f_mul(&rho_y)?.f_exp()?)?;
    let shape_term = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        let omega = a.f_sub(b)?.f_abs()?.f_div(&a.f_maximum(b)?)?;
        Ok(omega
            .f_mul_scalar(-1.0)?
            .f_exp()?
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_pow_tensor_scalar(4)?)
    };
    let shape = shape_term(&w1, &w2)?.f_add(&shape_term(&h1, &h2)?)?;
    let sious = ious.f_sub(&distance.f_add(&shape)?.f_mul_scalar(0.5)?)?;
    Ok(sious.f_clamp(-1.0, 1.0)?.f_neg()?.f_add_scalar(1.0)?)
}

/// MMDetection's `BoundedIoULoss` (Fitness NMS): smooth-L1 (`beta`) of the four bounded-IoU
/// terms `[dx, dy, dw, dh]` of each box, `1 - max((tw - 2|dx|) / (tw + 2|dx| + eps), 0)` for the
/// centre offsets and `1 - min(tw / (pw + eps), pw / (tw + eps))` for the sizes, the target's
/// centres and sizes constants. 'none' gives `(N, 4)`; the weight broadcasts against it (an
/// `(N,)` weight does not, as in MMDetection); an all-zero weight takes the short-cut.
///
/// Composed of stock ops: its loss is per coordinate, `(N, 4)`, with each term reading two
/// coordinates, which is neither the element shape (one input per output) nor the box shape
/// (one output per box).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let loss = registry::build_str(r#"{"type": "BoundedIoULoss", "beta": 0.2}"#)?;
/// let pred = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 2.0]).view([1, 4]).set_requires_grad(true);
/// let target = Tensor::from_slice(&[1.0f32, 0.0, 3.0, 2.0]).view([1, 4]);
/// loss.forward(&pred, (&target).into(), &LossArgs::new())?.backward();
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BoundedIoULoss {
    /// The smooth-L1 switch point.
    pub beta: f64,
    /// Added to the denominators.
    pub eps: f64,
    /// The default reduction.
    pub reduction: Reduction,
    /// Multiplies the result.
    pub loss_weight: f64,
}

impl Default for BoundedIoULoss {
    fn default() -> Self {
        Self {
            beta: 0.2,
            eps: 1e-3,
            reduction: Reduction::Mean,
            loss_weight: 1.0,
        }
    }
}

const BOUNDED: &str = "BoundedIoULoss";

impl BoundedIoULoss {
    /// MMDetection's constructor checks (there are none).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// `bounded_iou_loss`'s element loss `(N, 4)`.
    fn elem(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        let [x1, y1, x2, y2] = cols(pred)?;
        let centre =
            |a: &Tensor, b: &Tensor| -> Result<Tensor> { Ok(a.f_add(b)?.f_mul_scalar(0.5)?) };
        let (pcx, pcy) = (centre(&x1, &x2)?, centre(&y1, &y2)?);
        let (pw, ph) = (x2.f_sub(&x1)?, y2.f_sub(&y1)?);
        let [u1, v1, u2, v2] = cols(&target.f_detach()?)?;
        let (tcx, tcy) = (centre(&u1, &u2)?, centre(&v1, &v2)?);
        let (tw, th) = (u2.f_sub(&u1)?, v2.f_sub(&v1)?);
        let eps = self.eps;
        let offset = |t_size: &Tensor, d: &Tensor| -> Result<Tensor> {
            let two = d.f_abs()?.f_mul_scalar(2.0)?;
            let r = t_size
                .f_sub(&two)?
                .f_div(&t_size.f_add(&two)?.f_add_scalar(eps)?)?;
            Ok(r.f_maximum(&r.f_zeros_like()?)?
                .f_neg()?
                .f_add_scalar(1.0)?)
        };
        let size = |t_size: &Tensor, p_size: &Tensor| -> Result<Tensor> {
            let a = t_size.f_div(&p_size.f_add_scalar(eps)?)?;
            let b = p_size.f_div(&t_size.f_add_scalar(eps)?)?;
            Ok(a.f_minimum(&b)?.f_neg()?.f_add_scalar(1.0)?)
        };
        let comb = Tensor::f_stack(
            &[
                offset(&tw, &tcx.f_sub(&pcx)?)?,
                offset(&th, &tcy.f_sub(&pcy)?)?,
                size(&tw, &pw)?,
                size(&th, &ph)?,
            ],
            -1,
        )?
        .f_flatten(1, -1)?;
        let beta = self.beta;
        let quad = comb.f_mul_scalar(0.5)?.f_mul(&comb)?.f_div_scalar(beta)?;
        Ok(quad.f_where_self(&comb.f_lt(beta)?, &comb.f_sub_scalar(0.5 * beta)?)?)
    }
}

impl BoundedIoULoss {
    /// `bounded_iou_loss` in stock ops.
    fn composed(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let reduction = begin(BOUNDED, pred, target, args, self.reduction)?;
        let t = single_target(BOUNDED, target)?;
        ensure!(
            pred.dim() == 2 && pred.size()[1] == 4 && t.size() == pred.size(),
            "{BOUNDED}: pred and target must be (N, 4) boxes (x1, y1, x2, y2), got shapes {:?} and {:?}",
            pred.size(),
            t.size()
        );
        if let Some(w) = args.weight {
            if shortcut::no_positive(w)? {
                return shortcut::unfused(pred, w);
            }
        }
        let loss = self.elem(pred, &t.f_type_as(pred)?)?;
        // torch's broadcast of the weight against (N, 4), with torch's message where it fails.
        let reduced = weight_reduce_loss(&loss, args.weight, reduction, args.avg_factor.as_ref())
            .map_err(|e| anyhow::anyhow!("{BOUNDED}: {e:#}"))?;
        Ok(reduced * self.loss_weight)
    }
}

super::composed_loss!(BoundedIoULoss, BOUNDED);
