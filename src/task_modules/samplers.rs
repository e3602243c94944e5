//! MMDetection's samplers (`mmdet/models/task_modules/samplers/`): `PseudoSampler` and
//! `RandomSampler`, as masks over a batch's priors.
//!
//! A [`SamplingResult`] holds `(B, M)` positive and negative masks and per-image counts as
//! tensors, so that a dense head builds its targets with no host read; index lists, as
//! MMDetection's `SamplingResult` has them, are computed on request (a host read).
//!
//! `RandomSampler` draws in one of two modes:
//! - [`SampleMode::Device`] (the default): a random key per prior and `topk` on the device,
//!   fixed shapes, no host read: capturable, not MMDetection's draws;
//! - [`SampleMode::Exact`]: MMDetection's own draws, `randperm` on the CPU's default generator
//!   image by image, so that after `tch::manual_seed(s)` it selects exactly what MMDetection
//!   selects after `torch.manual_seed(s)` (host reads; for reproducing a Python run).
//!
//! ```
//! use tch::{Kind, Tensor};
//! use tch_detloss::task_modules::{build_sampler, AssignResult};
//!
//! let sampler = build_sampler(&serde_json::json!({"type": "PseudoSampler"}))?;
//! let assign = AssignResult {
//!     num_gts: Tensor::from_slice(&[1i64]),
//!     gt_inds: Tensor::from_slice(&[0i64, 1, -1, 0]).view([1, 4]),
//!     max_overlaps: Tensor::from_slice(&[0.1f32, 0.7, 0.45, 0.0]).view([1, 4]),
//!     labels: Tensor::from_slice(&[-1i64, 2, -1, -1]).view([1, 4]),
//! };
//! let s = sampler.sample(&assign, None)?;
//! assert_eq!(Vec::<i64>::try_from(s.pos_inds(0)?)?, [1]);
//! assert_eq!(Vec::<i64>::try_from(s.neg_inds(0)?)?, [0, 3]);
//! assert_eq!(s.avg_factor().int64_value(&[]), 1);
//! # anyhow::Ok(())
//! ```

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::assigners::{AssignResult, GtBatch};
use crate::registry::parse_config;

/// What a sampler returns: masks over the `M` priors of each image (`M = G + N` when the
/// ground truths were added as proposals, the `G` of the padded batch first).
#[derive(Debug)]
pub struct SamplingResult {
    /// The assignment the sample was drawn from (after `add_gt` where the sampler adds them).
    pub assign: AssignResult,
    /// `(B, M)` bool: sampled positives.
    pub pos_mask: Tensor,
    /// `(B, M)` bool: sampled negatives.
    pub neg_mask: Tensor,
    /// `(B, M)` bool: entries that are ground truths added as proposals.
    pub gt_flags: Tensor,
    /// Whether `avg_factor` counts the negatives too (RandomSampler) or not (PseudoSampler).
    pub avg_factor_with_neg: bool,
}

impl SamplingResult {
    fn new(
        assign: AssignResult,
        pos_mask: Tensor,
        neg_mask: Tensor,
        gt_flags: Tensor,
        with_neg: bool,
    ) -> Self {
        Self {
            assign,
            pos_mask,
            neg_mask,
            gt_flags,
            avg_factor_with_neg: with_neg,
        }
    }

    /// Sampled positives per image, `(B,)` int64.
    pub fn pos_counts(&self) -> Tensor {
        self.pos_mask.sum_dim_intlist(1, false, Kind::Int64)
    }

    /// Sampled negatives per image, `(B,)` int64.
    pub fn neg_counts(&self) -> Tensor {
        self.neg_mask.sum_dim_intlist(1, false, Kind::Int64)
    }

    /// MMDetection's per-image `avg_factor`: `max(#pos, 1)`, plus `max(#neg, 1)` for samplers
    /// that count negatives. `(B,)` int64.
    pub fn avg_factors(&self) -> Tensor {
        let pos = self.pos_counts().clamp_min(1);
        if self.avg_factor_with_neg {
            pos + self.neg_counts().clamp_min(1)
        } else {
            pos
        }
    }

    /// The batch's `avg_factor`, the sum of the images' (what MMDetection's heads pass to the
    /// losses): a 0-dim int64 tensor on the masks' device, read by the fused losses there.
    pub fn avg_factor(&self) -> Tensor {
        self.avg_factors().sum(Kind::Int64)
    }

    /// Image `i`'s positive indices, ascending (a host read).
    pub fn pos_inds(&self, i: i64) -> Result<Tensor> {
        Ok(self.pos_mask.get(i).f_nonzero()?.f_view([-1])?)
    }

    /// Image `i`'s negative indices, ascending (a host read).
    pub fn neg_inds(&self, i: i64) -> Result<Tensor> {
        Ok(self.neg_mask.get(i).f_nonzero()?.f_view([-1])?)
    }

    /// Image `i`'s `pos_assigned_gt_inds`: the 0-based ground truth of each positive.
    pub fn pos_assigned_gt_inds(&self, i: i64) -> Result<Tensor> {
        Ok(self
            .assign
            .gt_inds
            .get(i)
            .f_index_select(0, &self.pos_inds(i)?)?
            - 1)
    }

    /// Image `i`'s `pos_gt_labels`.
    pub fn pos_gt_labels(&self, i: i64) -> Result<Tensor> {
        Ok(self
            .assign
            .labels
            .get(i)
            .f_index_select(0, &self.pos_inds(i)?)?)
    }

    /// Image `i`'s `pos_is_gt`, uint8.
    pub fn pos_is_gt(&self, i: i64) -> Result<Tensor> {
        Ok(self
            .gt_flags
            .get(i)
            .f_index_select(0, &self.pos_inds(i)?)?
            .f_to_kind(Kind::Uint8)?)
    }
}

/// How `RandomSampler` draws.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SampleMode {
    /// Random keys and `topk` on the device: no host read.
    #[default]
    Device,
    /// MMDetection's `randperm` draws on the CPU's default generator, image by image.
    Exact,
}

/// A sampler built from a config dict.
pub trait Sampler: Send + Sync {
    /// Samples positives and negatives from an assignment. `gts` is needed only by samplers
    /// that add the ground truths as proposals.
    fn sample(&self, assign: &AssignResult, gts: Option<&GtBatch>) -> Result<SamplingResult>;
    /// The MMDetection class name.
    fn type_name(&self) -> &'static str;
}

/// Builds `PseudoSampler` or `RandomSampler` (in [`SampleMode::Device`]) from a config dict.
pub fn build_sampler(config: &Value) -> Result<Box<dyn Sampler>> {
    match config.get("type").and_then(Value::as_str) {
        Some("PseudoSampler") => Ok(Box::new(PseudoSampler::from_config(config)?)),
        Some("RandomSampler") => Ok(Box::new(RandomSampler::from_config(config)?)),
        other => bail!("unknown sampler type {other:?} (known: PseudoSampler, RandomSampler)"),
    }
}

/// MMDetection's `PseudoSampler`: every positive and every negative, `avg_factor` without the
/// negatives.
#[derive(Clone, Copy, Debug, Default)]
pub struct PseudoSampler;

impl PseudoSampler {
    /// Builds it from its config dict (`{"type": "PseudoSampler"}`; other keys are ignored, as
    /// MMDetection ignores them).
    pub fn from_config(config: &Value) -> Result<Self> {
        ensure!(
            config.is_object(),
            "a sampler config must be a JSON object, got {config}"
        );
        Ok(Self)
    }
}

impl Sampler for PseudoSampler {
    fn sample(&self, assign: &AssignResult, _gts: Option<&GtBatch>) -> Result<SamplingResult> {
        check_assign(assign)?;
        let pos = assign.gt_inds.f_gt(0)?;
        let neg = assign.gt_inds.f_eq(0)?;
        let flags = assign.gt_inds.f_zeros_like()?.f_to_kind(Kind::Bool)?;
        Ok(SamplingResult::new(
            clone_assign(assign),
            pos,
            neg,
            flags,
            false,
        ))
    }
    fn type_name(&self) -> &'static str {
        "PseudoSampler"
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RandomConfig {
    num: i64,
    pos_fraction: f64,
    #[serde(default = "minus_one")]
    neg_pos_ub: f64,
    #[serde(default = "yes")]
    add_gt_as_proposals: bool,
    #[serde(default)]
    rng: Option<Value>,
}

fn minus_one() -> f64 {
    -1.0
}
fn yes() -> bool {
    true
}

/// MMDetection's `RandomSampler`: up to `num * pos_fraction` positives and then negatives up to
/// `num` in all (at most `neg_pos_ub` per positive where `neg_pos_ub >= 0`), each drawn
/// uniformly; optionally with the ground truths added as proposals first.
#[derive(Clone, Debug)]
pub struct RandomSampler {
    /// Priors sampled per image.
    pub num: i64,
    /// The share of positives.
    pub pos_fraction: f64,
    /// Negatives per positive at most (`< 0`: no bound).
    pub neg_pos_ub: f64,
    /// Put each image's ground truths in front of its priors as positives.
    pub add_gt_as_proposals: bool,
    /// How it draws.
    pub mode: SampleMode,
}

impl RandomSampler {
    /// Builds it from its config dict, in [`SampleMode::Device`].
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: RandomConfig = parse_config(config)?;
        ensure!(c.num >= 0, "RandomSampler: num must be >= 0, got {}", c.num);
        ensure!(
            (0.0..=1.0).contains(&c.pos_fraction),
            "RandomSampler: pos_fraction must be in [0, 1], got {}",
            c.pos_fraction
        );
        let _ = c.rng; // MMDetection keeps a numpy RandomState it never uses.
        Ok(Self {
            num: c.num,
            pos_fraction: c.pos_fraction,
            neg_pos_ub: c.neg_pos_ub,
            add_gt_as_proposals: c.add_gt_as_proposals,
            mode: SampleMode::Device,
        })
    }

    /// The same sampler drawing in `mode`.
    pub fn with_mode(mut self, mode: SampleMode) -> Self {
        self.mode = mode;
        self
    }

    fn expected_pos(&self) -> i64 {
        (self.num as f64 * self.pos_fraction) as i64
    }

    /// The negatives wanted next to `pos` positives, as MMDetection's `int()` bounds them.
    fn expected_neg_host(&self, pos: i64) -> i64 {
        let want = self.num - pos;
        if self.neg_pos_ub >= 0.0 {
            want.min((self.neg_pos_ub * pos.max(1) as f64) as i64)
        } else {
            want
        }
    }

    fn sample_exact(&self, assign: &AssignResult) -> Result<(Tensor, Tensor)> {
        let (b, m) = (assign.gt_inds.size()[0], assign.gt_inds.size()[1]);
        let dev = assign.gt_inds.device();
        let inds = assign.gt_inds.f_to_device(Device::Cpu)?;
        let mut pos_mask = Tensor::f_zeros([b, m], (Kind::Bool, Device::Cpu))?;
        let mut neg_mask = Tensor::f_zeros([b, m], (Kind::Bool, Device::Cpu))?;
        for i in 0..b {
            let row = inds.get(i);
            let pos = choose(&row.f_gt(0)?, self.expected_pos())?;
            let npos = pos.size()[0];
            let neg = choose(&row.f_eq(0)?, self.expected_neg_host(npos))?;
            let _ = pos_mask.get(i).f_index_fill_(0, &pos, 1)?;
            let _ = neg_mask.get(i).f_index_fill_(0, &neg, 1)?;
        }
        if dev != Device::Cpu {
            pos_mask = pos_mask.f_to_device(dev)?;
            neg_mask = neg_mask.f_to_device(dev)?;
        }
        Ok((pos_mask, neg_mask))
    }

    fn sample_device(&self, assign: &AssignResult) -> Result<(Tensor, Tensor)> {
        let inds = &assign.gt_inds;
        let m = inds.size()[1];
        let pos_mask = draw(&inds.f_gt(0)?, self.expected_pos().min(m), None)?;
        let npos = pos_mask.f_sum_dim_intlist(1, false, Kind::Int64)?;
        let mut want = (-&npos) + self.num;
        if self.neg_pos_ub >= 0.0 {
            // int(ub * max(1, pos)) for ub, pos >= 0: the floor, in double as Python computes it.
            let bound = (npos.f_clamp_min(1)?.f_to_kind(Kind::Double)? * self.neg_pos_ub)
                .f_floor()?
                .f_to_kind(Kind::Int64)?;
            want = want.f_minimum(&bound)?;
        }
        let neg_mask = draw(&inds.f_eq(0)?, self.num.min(m), Some(&want))?;
        Ok((pos_mask, neg_mask))
    }
}

impl Sampler for RandomSampler {
    fn sample(&self, assign: &AssignResult, gts: Option<&GtBatch>) -> Result<SamplingResult> {
        check_assign(assign)?;
        let b = assign.gt_inds.size()[0];
        let (assign, gt_flags) = if self.add_gt_as_proposals {
            let gts = gts.context("RandomSampler: add_gt_as_proposals needs the ground truths")?;
            let (gb, _) = gts.dims()?;
            ensure!(
                gb == b,
                "RandomSampler: ground truths of {gb} images for {b} assigned images"
            );
            let added = assign.add_gt(&gts.labels, &gts.valid)?;
            let flags = Tensor::f_cat(
                &[
                    &gts.valid,
                    &assign.gt_inds.f_zeros_like()?.f_to_kind(Kind::Bool)?,
                ],
                1,
            )?;
            (added, flags)
        } else {
            (
                clone_assign(assign),
                assign.gt_inds.f_zeros_like()?.f_to_kind(Kind::Bool)?,
            )
        };
        let (pos, neg) = match self.mode {
            SampleMode::Exact => self.sample_exact(&assign)?,
            SampleMode::Device => self.sample_device(&assign)?,
        };
        Ok(SamplingResult::new(assign, pos, neg, gt_flags, true))
    }
    fn type_name(&self) -> &'static str {
        "RandomSampler"
    }
}

/// MMDetection's `_sample_pos` / `_sample_neg` on one image: the candidates ascending, all of
/// them if there are at most `want`, else `candidates[randperm(count)[:want]]`.
fn choose(candidates: &Tensor, want: i64) -> Result<Tensor> {
    let gallery = candidates.f_nonzero()?.f_view([-1])?;
    let count = gallery.size()[0];
    if count <= want {
        return Ok(gallery);
    }
    let perm =
        Tensor::f_randperm(count, (Kind::Int64, Device::Cpu))?.f_narrow(0, 0, want.max(0))?;
    Ok(gallery.f_index_select(0, &perm)?)
}

/// Up to `k` uniformly drawn candidates per row (fewer where `want`, `(B,)`, says so): random keys
/// on the candidates and `topk`, as a mask.
fn draw(candidates: &Tensor, k: i64, want: Option<&Tensor>) -> Result<Tensor> {
    let (b, m) = (candidates.size()[0], candidates.size()[1]);
    let dev = candidates.device();
    let keys = Tensor::f_rand([b, m], (Kind::Float, dev))?.f_where_scalarother(candidates, -1.0)?;
    let out = Tensor::f_zeros([b, m], (Kind::Bool, dev))?;
    if k <= 0 || m == 0 {
        return Ok(out);
    }
    let (vals, idx) = keys.f_topk(k, 1, true, true)?;
    let mut take = vals.f_ge(0.0)?;
    if let Some(w) = want {
        let rank = Tensor::f_arange(k, (Kind::Int64, dev))?.f_unsqueeze(0)?;
        take = take.f_logical_and(&rank.f_lt_tensor(&w.f_unsqueeze(1)?)?)?;
    }
    Ok(out.f_scatter(1, &idx, &take)?)
}

fn check_assign(a: &AssignResult) -> Result<()> {
    let s = a.gt_inds.size();
    ensure!(
        s.len() == 2,
        "an assignment's gt_inds must be (B, N), got {s:?}"
    );
    ensure!(
        a.gt_inds.kind() == Kind::Int64,
        "gt_inds must be int64, got {:?}",
        a.gt_inds.kind()
    );
    ensure!(
        a.labels.size() == s && a.max_overlaps.size() == s,
        "assignment fields disagree: gt_inds {s:?}, labels {:?}, max_overlaps {:?}",
        a.labels.size(),
        a.max_overlaps.size()
    );
    Ok(())
}

fn clone_assign(a: &AssignResult) -> AssignResult {
    AssignResult {
        num_gts: a.num_gts.shallow_clone(),
        gt_inds: a.gt_inds.shallow_clone(),
        max_overlaps: a.max_overlaps.shallow_clone(),
        labels: a.labels.shallow_clone(),
    }
}
