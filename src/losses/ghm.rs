//! mmdet/models/losses/ghm_loss.py: [`GHMC`] and [`GHMR`] on the histogram executor (kernel
//! bodies `kernels/ghmc.cuh`, `kernels/ghmr.cuh`).

use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{begin, pred_shape, single_target};
use crate::abi::MAX_BINS;
use crate::checks::broadcast_shapes;
use crate::fused::{self, Body, Hist, KTarget, Shape, Spec};
use crate::reduction::{weight_reduce_loss, AvgFactor, Reduction, SUM_WITH_AVG_FACTOR};
use crate::{Loss, LossArgs, Target};

const NAME: &str = "GHMC";

/// GHM's momentum state `acc_sum`: float32 `(bins,)`, on the device of the last call, updated in
/// place by each call. A lock serializes the calls that share it (the loss is `Sync`); on CUDA
/// the updates are ordered as the calls' streams order them.
#[derive(Default)]
pub struct MomentumState(Mutex<Option<Tensor>>);

impl MomentumState {
    fn lock(&self) -> Result<MutexGuard<'_, Option<Tensor>>> {
        self.0
            .lock()
            .map_err(|_| anyhow!("the momentum state's lock is poisoned"))
    }

    /// The state for a call on `device`: zeros at first, moved there if it lives elsewhere.
    fn on_device<'a>(
        guard: &'a mut MutexGuard<'_, Option<Tensor>>,
        bins: i64,
        device: Device,
    ) -> Result<&'a Tensor> {
        let fresh = match guard.as_ref() {
            Some(t) if t.device() == device => None,
            Some(t) => Some(t.f_to_device(device)?),
            None => Some(Tensor::f_zeros([bins], (Kind::Float, device))?),
        };
        if let Some(t) = fresh {
            **guard = Some(t);
        }
        guard
            .as_ref()
            .ok_or_else(|| anyhow!("the momentum state is missing"))
    }
}

impl Clone for MomentumState {
    fn clone(&self) -> Self {
        let copy = self
            .0
            .lock()
            .ok()
            .and_then(|g| g.as_ref().and_then(|t| deep_copy(t).ok()));
        Self(Mutex::new(copy))
    }
}

impl std::fmt::Debug for MomentumState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self
            .0
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|t| t.device()))
        {
            Some(d) => write!(f, "MomentumState(on {d:?})"),
            None => write!(f, "MomentumState(zeros)"),
        }
    }
}

/// MMDetection's `GHMC`, the gradient harmonizing classification loss: BCE-with-logits where an
/// element's weight is `tot / (elements whose gradient norm |sigmoid(x) - t| falls in its bin)`,
/// divided by the number of non-empty bins, with `tot` the number of elements whose
/// `label_weight` is > 0 (`label_weight` is only a mask). 'mean' divides by `tot`; 'none' gives
/// the weighted `(N, C)` loss, not divided; 'sum' is MMDetection's error.
///
/// Call it with `label_weight` as [`LossArgs::weight`] (required): `(N,)` with class-index
/// targets `(N,)` (labels outside `[0, C)` are negatives), or broadcasting against `(N, C)` with
/// a binary `(N, C)` target. `avg_factor` is accepted and ignored, as MMDetection's `**kwargs`.
///
/// The bins are MMDetection's float32 edges `i / bins` with the last at `1 + 1e-6`; with
/// `momentum > 0` each call moves the state `acc_sum` (see [`Loss::state`]) towards the counts
/// on the device. No value is read back to the host.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let ghmc = registry::build_str(r#"{"type": "GHMC", "bins": 30, "momentum": 0.75}"#)?;
/// let pred = Tensor::randn([16, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let labels = Tensor::from_slice(&[0i64, 4, 1, 4, 2, 3, 4, 4, 0, 1, 4, 4, 2, 4, 3, 4]);
/// let label_weight = Tensor::ones([16], (Kind::Float, Device::Cpu));
/// let l = ghmc.forward(&pred, (&labels).into(), &LossArgs::new().weight(&label_weight))?;
/// l.backward();
/// let (name, acc_sum) = &ghmc.state()?[0];
/// assert_eq!((name.as_str(), acc_sum.size()), ("acc_sum", vec![30]));
/// # anyhow::Ok(())
/// ```
#[allow(clippy::upper_case_acronyms)] // MMDetection's name
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GHMC {
    /// The number of bins of the gradient norm.
    pub bins: i64,
    /// The momentum of the moving average of the bin counts; 0 for none.
    pub momentum: f64,
    /// Must be true (MMDetection raises NotImplementedError otherwise).
    pub use_sigmoid: bool,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// The default reduction ('sum' is an error).
    pub reduction: Reduction,
    /// The momentum state (`acc_sum`), not part of the config.
    #[serde(skip)]
    pub acc_sum: MomentumState,
}

impl Default for GHMC {
    fn default() -> Self {
        Self {
            bins: 10,
            momentum: 0.0,
            use_sigmoid: true,
            loss_weight: 1.0,
            reduction: Reduction::Mean,
            acc_sum: MomentumState::default(),
        }
    }
}

impl GHMC {
    /// MMDetection's constructor checks, and the range of `bins` the kernels take.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.use_sigmoid,
            "{NAME}: only use_sigmoid=true is implemented (MMDetection raises NotImplementedError)"
        );
        ensure!(
            (1..=MAX_BINS).contains(&self.bins),
            "{NAME}: bins must be in [1, {MAX_BINS}], got {}",
            self.bins
        );
        ensure!(
            (0.0..1.0).contains(&self.momentum),
            "{NAME}: momentum must be in [0, 1), got {}",
            self.momentum
        );
        Ok(())
    }

    /// The last bin edge as MMDetection makes it: `edges[-1] += 1e-6` in float32.
    fn last_edge() -> f64 {
        f64::from(1.0f32 + 1e-6f32)
    }

    /// The checks before either path: the reduction (never 'sum') and the label weight.
    fn start<'a>(
        &self,
        pred: &Tensor,
        target: Target<'a>,
        args: &'a LossArgs<'_>,
    ) -> Result<(Reduction, &'a Tensor, &'a Tensor)> {
        self.validate()?;
        // `avg_factor` goes to MMDetection's **kwargs: checked for what it is, then ignored.
        let reduction = begin(NAME, pred, target, args, self.reduction)?;
        if reduction == Reduction::Sum {
            bail!("{NAME}: {SUM_WITH_AVG_FACTOR} (GHMC always divides by its total)");
        }
        let label_weight = args
            .weight
            .ok_or_else(|| anyhow!("{NAME}: label_weight (LossArgs::weight) is required"))?;
        Ok((reduction, single_target(NAME, target)?, label_weight))
    }
}

impl Loss for GHMC {
    fn type_name(&self) -> &str {
        NAME
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let (reduction, target, label_weight) = self.start(pred, target, args)?;
        let (n, c) = pred_shape(NAME, pred)?;
        let (kt, t, lw);
        if pred.dim() != target.dim() {
            // Class indices: one-hot rows made by the kernels; `label_weight.view(-1, 1)`.
            lw = label_weight.f_reshape([-1, 1])?;
            broadcast_shapes(&[n, c], &lw.size())?;
            kt = KTarget::Labels(target);
        } else {
            broadcast_shapes(&[n, c], &label_weight.size())?;
            lw = label_weight.shallow_clone();
            // MMDetection's `target.float()`.
            t = target.f_to_kind(Kind::Float)?;
            kt = KTarget::Dense(&t);
        }
        // `label_weight.float() > 0`.
        let lw = lw.f_to_kind(Kind::Float)?;
        let mut guard = self.acc_sum.lock()?;
        let state = if self.momentum > 0.0 {
            Some(MomentumState::on_device(&mut guard, self.bins, pred.device())?.shallow_clone())
        } else {
            None
        };
        let mut spec = Spec::new(
            Body::Ghmc,
            NAME,
            Shape::Element,
            reduction,
            self.loss_weight,
        );
        spec.hist = Some(Hist {
            bins: self.bins,
            momentum: self.momentum,
            last_edge: Self::last_edge(),
            state,
            tot: None,
            // With class indices MMDetection expands the label weight to (N, C) first.
            weight_numel: if matches!(kt, KTarget::Labels(_)) {
                n * c
            } else {
                label_weight.numel() as i64
            },
        });
        fused::run(spec, pred, kt, Some(&lw), None)
    }

    /// `GHMC.forward` in stock ops: one host read for the total and two per bin, as MMDetection.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        let (reduction, target, label_weight) = self.start(pred, target, args)?;
        let (n, c) = pred_shape(NAME, pred)?;
        let (target, label_weight) = if pred.dim() != target.dim() {
            // `_expand_onehot_labels`.
            crate::checks::integer(NAME, "target", target)?;
            ensure!(
                target.dim() == 1 && target.size()[0] == n,
                "{NAME}: class-index target must be ({n},), got {:?}",
                target.size()
            );
            let labels = target.f_to_kind(Kind::Int64)?;
            let in_range = labels.f_ge(0)?.f_logical_and(&labels.f_lt(c)?)?;
            let bin_labels = super::one_hot_where(&labels, c, &in_range)?;
            let lw = label_weight.f_view([-1, 1])?.f_expand([n, c], false)?;
            (bin_labels, lw)
        } else {
            (target.shallow_clone(), label_weight.shallow_clone())
        };
        let target = target.f_to_kind(Kind::Float)?;
        let label_weight = label_weight.f_to_kind(Kind::Float)?;
        let g = pred.f_detach()?.f_sigmoid()?.f_sub(&target)?.f_abs()?;
        let valid = label_weight.f_gt(0.0)?;
        let tot = valid
            .f_to_kind(Kind::Float)?
            .f_sum(Kind::Float)?
            .f_double_value(&[])?
            .max(1.0);
        let weights = unfused_bin_weights(
            pred,
            &g,
            &valid,
            tot,
            GhmBins {
                bins: self.bins,
                last_edge: Self::last_edge(),
                momentum: self.momentum,
                acc_sum: &self.acc_sum,
            },
        )?;
        let loss = pred.f_binary_cross_entropy_with_logits::<Tensor>(
            &target,
            None,
            None,
            tch::Reduction::None,
        )?;
        Ok(weight_reduce_loss(
            &loss,
            Some(&weights),
            reduction,
            Some(&AvgFactor::Value(tot)),
        )? * self.loss_weight)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        momentum_state(&self.acc_sum, self.momentum, self.bins)
    }

    fn load_state(&self, name: &str, value: &Tensor) -> Result<()> {
        load_momentum_state(&self.acc_sum, NAME, self.momentum, self.bins, name, value)
    }
}

/// A GHM loss's bins: their number, the last edge, the momentum and its state.
struct GhmBins<'a> {
    bins: i64,
    last_edge: f64,
    momentum: f64,
    acc_sum: &'a MomentumState,
}

/// The GHM weights of the elements `g` (gradient norms) as MMDetection's loop makes them: bins
/// between float32 edges `i / bins` (the last at `last_edge`), restricted to `valid`; each
/// non-empty bin's weight `tot / count` (or `tot / acc_sum[i]` after the momentum update, in
/// float32), divided by the number of non-empty bins, in a tensor like `like` (MMDetection's
/// `zeros_like(pred)` in GHM-C, `zeros_like(g)` in GHM-R). One host read per bin, as MMDetection.
fn unfused_bin_weights(
    like: &Tensor,
    g: &Tensor,
    valid: &Tensor,
    tot: f64,
    h: GhmBins<'_>,
) -> Result<Tensor> {
    let GhmBins {
        bins,
        last_edge,
        momentum,
        acc_sum,
    } = h;
    let device = g.device();
    let edges = Tensor::f_arange(bins + 1, (Kind::Float, Device::Cpu))?.f_div_scalar(bins)?;
    let _ = edges.f_get(bins)?.f_fill_(last_edge)?;
    let edges = edges.f_to_device(device)?;
    let mut weights = like.f_zeros_like()?;
    let mut guard = acc_sum.lock()?;
    let acc_sum = if momentum > 0.0 {
        Some(MomentumState::on_device(&mut guard, bins, device)?.shallow_clone())
    } else {
        None
    };
    let mut nonempty = 0;
    for i in 0..bins {
        let inds = g
            .f_ge_tensor(&edges.f_get(i)?)?
            .f_logical_and(&g.f_lt_tensor(&edges.f_get(i + 1)?)?)?
            .f_logical_and(valid)?;
        let num_in_bin = inds.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        if num_in_bin > 0 {
            nonempty += 1;
            match &acc_sum {
                Some(acc) => {
                    let mut a = acc.f_get(i)?;
                    let updated = a
                        .f_mul_scalar(momentum)?
                        .f_add_scalar((1.0 - momentum) * num_in_bin as f64)?;
                    a.f_copy_(&updated)?;
                    let w = a.f_reciprocal()?.f_mul_scalar(tot)?;
                    weights = weights.f_masked_fill_tensor(&inds, &w)?;
                }
                None => weights = weights.f_masked_fill(&inds, tot / num_in_bin as f64)?,
            }
        }
    }
    if nonempty > 0 {
        weights = weights.f_div_scalar(nonempty)?;
    }
    Ok(weights)
}

/// GHMR's total, MMDetection's `label_weight.float().sum()` (a float32 sum, on the device), the
/// same whatever torch's thread count. Below torch's grain size (32,768 elements) torch's CPU sum
/// runs on one thread, in the order of MMDetection's own call; a larger CPU sum in torch depends on
/// the thread count, so it is taken as rows of 16,384 elements (a row each on one thread), then
/// their sums likewise. CUDA's sum is deterministic as it is.
fn float32_total(lw: &Tensor) -> Result<Tensor> {
    const GRAIN: i64 = 32_768;
    const ROW: i64 = 16_384;
    let mut t = lw.f_to_kind(Kind::Float)?.f_reshape([-1])?;
    if t.device() == Device::Cpu {
        while t.numel() as i64 >= GRAIN {
            let n = t.numel() as i64;
            let rows = (n + ROW - 1) / ROW;
            t = t
                .f_constant_pad_nd([0, rows * ROW - n])?
                .f_view([rows, ROW])?
                .f_sum_dim_intlist(1, false, Kind::Float)?;
        }
    }
    Ok(t.f_sum(Kind::Float)?)
}

/// [`Loss::state`] of a GHM loss: a copy of `acc_sum` (zeros before the first call), or nothing
/// without momentum.
fn momentum_state(
    acc_sum: &MomentumState,
    momentum: f64,
    bins: i64,
) -> Result<Vec<(String, Tensor)>> {
    if momentum <= 0.0 {
        return Ok(Vec::new());
    }
    let guard = acc_sum.lock()?;
    let t = match guard.as_ref() {
        Some(t) => deep_copy(t)?,
        None => Tensor::f_zeros([bins], (Kind::Float, Device::Cpu))?,
    };
    Ok(vec![("acc_sum".to_string(), t)])
}

/// [`Loss::load_state`] of a GHM loss.
fn load_momentum_state(
    acc_sum: &MomentumState,
    name_of_loss: &str,
    momentum: f64,
    bins: i64,
    name: &str,
    value: &Tensor,
) -> Result<()> {
    ensure!(
        name == "acc_sum" && momentum > 0.0,
        "{name_of_loss}: no state named {name:?} (acc_sum exists with momentum > 0)"
    );
    crate::checks::real(name_of_loss, "acc_sum", value)?;
    ensure!(
        value.size() == [bins],
        "{name_of_loss}: acc_sum must be ({bins},), got {:?}",
        value.size()
    );
    let t = deep_copy(&value.f_detach()?.f_to_kind(Kind::Float)?)?;
    *acc_sum.lock()? = Some(t);
    Ok(())
}

/// A contiguous copy that shares no storage with `t`.
fn deep_copy(t: &Tensor) -> Result<Tensor> {
    let mut c = Tensor::f_empty(t.size(), (t.kind(), t.device()))?;
    c.f_copy_(t)?;
    Ok(c)
}

const GHMR_NAME: &str = "GHMR";

/// MMDetection's `GHMR`, the gradient harmonizing regression loss: the authentic smooth L1
/// `sqrt(d^2 + mu^2) - mu` (`d = pred - target`) where an element's weight is
/// `tot / (elements whose gradient norm |d| / sqrt(d^2 + mu^2) falls in its bin)`, divided by the
/// number of non-empty bins, with `tot` the **sum** of `label_weight` (otherwise only a mask).
/// 'mean' divides by `tot`; 'none' gives the weighted loss, not divided; 'sum' is MMDetection's
/// error.
///
/// Call it with `label_weight` as [`LossArgs::weight`] (required), broadcasting against pred
/// `(N, 4)`; the target has pred's shape. `avg_factor` is accepted and ignored, as MMDetection's.
/// The bins are MMDetection's float32 edges `i / bins` with the last at `1e3`; with
/// `momentum > 0` each call moves the state `acc_sum` (see [`Loss::state`]) on the device. No
/// value is read back to the host.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::{registry, LossArgs};
/// let ghmr = registry::build_str(r#"{"type": "GHMR", "mu": 0.02, "bins": 10, "momentum": 0.7}"#)?;
/// let pred = Tensor::randn([16, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let target = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
/// let label_weight = Tensor::ones([16, 4], (Kind::Float, Device::Cpu));
/// ghmr.forward(&pred, (&target).into(), &LossArgs::new().weight(&label_weight))?.backward();
/// # anyhow::Ok(())
/// ```
#[allow(clippy::upper_case_acronyms)] // MMDetection's name
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GHMR {
    /// The smooth L1's parameter.
    pub mu: f64,
    /// The number of bins of the gradient norm.
    pub bins: i64,
    /// The momentum of the moving average of the bin counts; 0 for none.
    pub momentum: f64,
    /// Multiplies the result.
    pub loss_weight: f64,
    /// The default reduction ('sum' is an error).
    pub reduction: Reduction,
    /// The momentum state (`acc_sum`), not part of the config.
    #[serde(skip)]
    pub acc_sum: MomentumState,
}

impl Default for GHMR {
    fn default() -> Self {
        Self {
            mu: 0.02,
            bins: 10,
            momentum: 0.0,
            loss_weight: 1.0,
            reduction: Reduction::Mean,
            acc_sum: MomentumState::default(),
        }
    }
}

impl GHMR {
    /// The range of `bins` the kernels take and of `momentum`.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=MAX_BINS).contains(&self.bins),
            "{GHMR_NAME}: bins must be in [1, {MAX_BINS}], got {}",
            self.bins
        );
        ensure!(
            (0.0..1.0).contains(&self.momentum),
            "{GHMR_NAME}: momentum must be in [0, 1), got {}",
            self.momentum
        );
        Ok(())
    }

    /// The checks before either path: the reduction (never 'sum'), the shapes, the label weight.
    fn start<'a>(
        &self,
        pred: &Tensor,
        target: Target<'a>,
        args: &'a LossArgs<'_>,
    ) -> Result<(Reduction, &'a Tensor, &'a Tensor)> {
        self.validate()?;
        let reduction = begin(GHMR_NAME, pred, target, args, self.reduction)?;
        if reduction == Reduction::Sum {
            bail!("{GHMR_NAME}: {SUM_WITH_AVG_FACTOR} (GHMR always divides by its total)");
        }
        let target = single_target(GHMR_NAME, target)?;
        ensure!(
            target.size() == pred.size(),
            "{GHMR_NAME}: target must have pred's shape {:?}, got {:?}",
            pred.size(),
            target.size()
        );
        let label_weight = args
            .weight
            .ok_or_else(|| anyhow!("{GHMR_NAME}: label_weight (LossArgs::weight) is required"))?;
        super::check_weight_shape(GHMR_NAME, label_weight, &pred.size())?;
        Ok((reduction, target, label_weight))
    }
}

impl Loss for GHMR {
    fn type_name(&self) -> &str {
        GHMR_NAME
    }

    fn forward(&self, pred: &Tensor, target: Target<'_>, args: &LossArgs<'_>) -> Result<Tensor> {
        let (reduction, target, label_weight) = self.start(pred, target, args)?;
        pred_shape(GHMR_NAME, pred)?;
        // `label_weight.float()`: its sum is the total.
        let lw = label_weight.f_to_kind(Kind::Float)?;
        let mut guard = self.acc_sum.lock()?;
        let state = if self.momentum > 0.0 {
            Some(MomentumState::on_device(&mut guard, self.bins, pred.device())?.shallow_clone())
        } else {
            None
        };
        // Slots: p0 = mu, p1 = mu * mu (kernels/ghmr.cuh).
        let mut spec = Spec::new(
            Body::Ghmr,
            GHMR_NAME,
            Shape::Element,
            reduction,
            self.loss_weight,
        );
        spec.params = [self.mu, self.mu * self.mu, 0.0, 0.0];
        spec.hist = Some(Hist {
            bins: self.bins,
            momentum: self.momentum,
            last_edge: 1e3,
            state,
            tot: Some(float32_total(&lw)?),
            weight_numel: label_weight.numel() as i64,
        });
        fused::run(spec, pred, KTarget::Dense(target), Some(&lw), None)
    }

    /// `GHMR.forward` in stock ops: one host read for the total and one per bin, as MMDetection.
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        args: &LossArgs<'_>,
    ) -> Result<Tensor> {
        let (reduction, target, label_weight) = self.start(pred, target, args)?;
        let mu = self.mu;
        let diff = pred.f_sub(&target.f_type_as(pred)?)?;
        let loss = diff
            .f_mul(&diff)?
            .f_add_scalar(mu * mu)?
            .f_sqrt()?
            .f_sub_scalar(mu)?;
        let g = diff
            .f_div(&diff.f_mul(&diff)?.f_add_scalar(mu * mu)?.f_sqrt()?)?
            .f_abs()?
            .f_detach()?;
        let valid = label_weight.f_gt(0.0)?;
        let tot = label_weight
            .f_to_kind(Kind::Float)?
            .f_sum(Kind::Float)?
            .f_double_value(&[])?
            .max(1.0);
        let weights = unfused_bin_weights(
            &g,
            &g,
            &valid,
            tot,
            GhmBins {
                bins: self.bins,
                last_edge: 1e3,
                momentum: self.momentum,
                acc_sum: &self.acc_sum,
            },
        )?;
        Ok(weight_reduce_loss(
            &loss,
            Some(&weights),
            reduction,
            Some(&AvgFactor::Value(tot)),
        )? * self.loss_weight)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        momentum_state(&self.acc_sum, self.momentum, self.bins)
    }

    fn load_state(&self, name: &str, value: &Tensor) -> Result<()> {
        load_momentum_state(
            &self.acc_sum,
            GHMR_NAME,
            self.momentum,
            self.bins,
            name,
            value,
        )
    }
}
