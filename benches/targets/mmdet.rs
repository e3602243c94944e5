//! The baseline: MMDetection 3.3's assigners written with stock tch ops, image by image, line for
//! line as `mmdet/models/task_modules/assigners/{dynamic_soft_label,task_aligned}_assigner.py`
//! (each Python statement is quoted above its translation). Boolean-mask indexing, `nonzero`,
//! `k=dynamic_ks[gt_idx]` and `if tensor:` read the device back where the Python does, and the
//! per-ground-truth loops stay loops. `self.iou_calculator` (`BboxOverlaps2D`) is MMDetection's
//! `bbox_overlaps`, here `tch_detloss::task_modules::bbox_overlaps` (the same stock ops).
//!
//! What a head does around them (`multi_apply` over images, the `InstanceData`s) is left out: the
//! per-image inputs are views of the batch, as `multi_apply` hands them over.

use anyhow::Result;
use tch::{Kind, Tensor};
use tch_detloss::task_modules::bbox_overlaps;

/// MMDetection's `INF` (an int: `-INF` fills float tensors with -1e8) and the assigner's `EPS`.
const INF: i64 = 100_000_000;
const EPS: f64 = 1.0e-7;

/// One image's `AssignResult` fields, `(N,)` each.
pub struct ImageResult {
    pub gt_inds: Tensor,
    pub max_overlaps: Tensor,
    pub labels: Tensor,
    /// `assign_metrics` (TaskAlignedAssigner only).
    pub assign_metrics: Option<Tensor>,
}

/// `python_variable_indexing`'s scalar for `x[...] = 1`: a 0-dim tensor of `like`'s dtype on its
/// device.
fn scalar(v: i64, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_scalar_tensor(v, (like.kind(), like.device()))?)
}

/// `DynamicSoftLabelAssigner(soft_center_radius, topk, iou_weight)`.
pub struct DynamicSoftLabel {
    pub soft_center_radius: f64,
    pub topk: i64,
    pub iou_weight: f64,
}

impl DynamicSoftLabel {
    /// `assign(pred_instances, gt_instances)` for tensor boxes without masks.
    pub fn assign(
        &self,
        priors: &Tensor,
        decoded_bboxes: &Tensor,
        pred_scores: &Tensor,
        gt_bboxes: &Tensor,
        gt_labels: &Tensor,
    ) -> Result<ImageResult> {
        // num_gt = gt_bboxes.size(0); num_bboxes = decoded_bboxes.size(0)
        let num_gt = gt_bboxes.size()[0];
        let num_bboxes = decoded_bboxes.size()[0];
        let dev = decoded_bboxes.device();
        // assigned_gt_inds = decoded_bboxes.new_full((num_bboxes, ), 0, dtype=torch.long)
        let mut assigned_gt_inds = Tensor::f_full([num_bboxes], 0, (Kind::Int64, dev))?;
        // if num_gt == 0 or num_bboxes == 0: ... return
        if num_gt == 0 || num_bboxes == 0 {
            return Ok(ImageResult {
                max_overlaps: Tensor::f_zeros([num_bboxes], (decoded_bboxes.kind(), dev))?,
                labels: Tensor::f_full([num_bboxes], -1, (Kind::Int64, dev))?,
                gt_inds: assigned_gt_inds,
                assign_metrics: None,
            });
        }
        // prior_center = priors[:, :2]
        let prior_center = priors.f_narrow(1, 0, 2)?;
        // lt_ = prior_center[:, None] - gt_bboxes[:, :2]
        let lt_ = prior_center
            .f_unsqueeze(1)?
            .f_sub(&gt_bboxes.f_narrow(1, 0, 2)?)?;
        // rb_ = gt_bboxes[:, 2:] - prior_center[:, None]
        let rb_ = gt_bboxes
            .f_narrow(1, 2, 2)?
            .f_sub(&prior_center.f_unsqueeze(1)?)?;
        // deltas = torch.cat([lt_, rb_], dim=-1)
        let deltas = Tensor::f_cat(&[&lt_, &rb_], -1)?;
        // is_in_gts = deltas.min(dim=-1).values > 0
        let is_in_gts = deltas.f_min_dim(-1, false)?.0.f_gt(0)?;
        // valid_mask = is_in_gts.sum(dim=1) > 0
        let mut valid_mask = is_in_gts
            .f_sum_dim_intlist(1, false, None::<Kind>)?
            .f_gt(0)?;
        // valid_decoded_bbox = decoded_bboxes[valid_mask]
        let valid_decoded_bbox = decoded_bboxes.f_index(&[Some(&valid_mask)])?;
        // valid_pred_scores = pred_scores[valid_mask]
        let valid_pred_scores = pred_scores.f_index(&[Some(&valid_mask)])?;
        // num_valid = valid_decoded_bbox.size(0)
        let num_valid = valid_decoded_bbox.size()[0];
        // if num_valid == 0: ... return
        if num_valid == 0 {
            return Ok(ImageResult {
                max_overlaps: Tensor::f_zeros([num_bboxes], (decoded_bboxes.kind(), dev))?,
                labels: Tensor::f_full([num_bboxes], -1, (Kind::Int64, dev))?,
                gt_inds: assigned_gt_inds,
                assign_metrics: None,
            });
        }
        // gt_center = (gt_bboxes[:, :2] + gt_bboxes[:, 2:]) / 2.0
        let gt_center = gt_bboxes
            .f_narrow(1, 0, 2)?
            .f_add(&gt_bboxes.f_narrow(1, 2, 2)?)?
            .f_div_scalar(2.0)?;
        // valid_prior = priors[valid_mask]
        let valid_prior = priors.f_index(&[Some(&valid_mask)])?;
        // strides = valid_prior[:, 2]
        let strides = valid_prior.f_select(1, 2)?;
        // distance = (valid_prior[:, None, :2] - gt_center[None, :, :]
        //             ).pow(2).sum(-1).sqrt() / strides[:, None]
        let distance = valid_prior
            .f_narrow(1, 0, 2)?
            .f_unsqueeze(1)?
            .f_sub(&gt_center.f_unsqueeze(0)?)?
            .f_pow_tensor_scalar(2)?
            .f_sum_dim_intlist(-1, false, None::<Kind>)?
            .f_sqrt()?
            .f_div(&strides.f_unsqueeze(1)?)?;
        // soft_center_prior = torch.pow(10, distance - self.soft_center_radius)
        let soft_center_prior =
            Tensor::f_pow_scalar(10, &distance.f_sub_scalar(self.soft_center_radius)?)?;
        // pairwise_ious = self.iou_calculator(valid_decoded_bbox, gt_bboxes)
        let pairwise_ious = bbox_overlaps(&valid_decoded_bbox, gt_bboxes, false)?;
        // iou_cost = -torch.log(pairwise_ious + EPS) * self.iou_weight
        let iou_cost = pairwise_ious
            .f_add_scalar(EPS)?
            .f_log()?
            .f_neg()?
            .f_mul_scalar(self.iou_weight)?;
        // gt_onehot_label = (F.one_hot(gt_labels.to(torch.int64), pred_scores.shape[-1])
        //                    .float().unsqueeze(0).repeat(num_valid, 1, 1))
        let gt_onehot_label = gt_labels
            .f_to_kind(Kind::Int64)?
            .f_one_hot(pred_scores.size()[pred_scores.dim() - 1])?
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(0)?
            .f_repeat([num_valid, 1, 1])?;
        // valid_pred_scores = valid_pred_scores.unsqueeze(1).repeat(1, num_gt, 1)
        let valid_pred_scores = valid_pred_scores.f_unsqueeze(1)?.f_repeat([1, num_gt, 1])?;
        // soft_label = gt_onehot_label * pairwise_ious[..., None]
        let soft_label = gt_onehot_label.f_mul(&pairwise_ious.f_unsqueeze(-1)?)?;
        // scale_factor = soft_label - valid_pred_scores.sigmoid()
        let scale_factor = soft_label.f_sub(&valid_pred_scores.f_sigmoid()?)?;
        // soft_cls_cost = F.binary_cross_entropy_with_logits(
        //     valid_pred_scores, soft_label, reduction='none') * scale_factor.abs().pow(2.0)
        let soft_cls_cost = valid_pred_scores
            .f_binary_cross_entropy_with_logits::<Tensor>(
                &soft_label,
                None,
                None,
                tch::Reduction::None,
            )?
            .f_mul(&scale_factor.f_abs()?.f_pow_tensor_scalar(2.0)?)?;
        // soft_cls_cost = soft_cls_cost.sum(dim=-1)
        let soft_cls_cost = soft_cls_cost.f_sum_dim_intlist(-1, false, None::<Kind>)?;
        // cost_matrix = soft_cls_cost + iou_cost + soft_center_prior
        let cost_matrix = soft_cls_cost.f_add(&iou_cost)?.f_add(&soft_center_prior)?;

        // matched_pred_ious, matched_gt_inds = self.dynamic_k_matching(
        //     cost_matrix, pairwise_ious, num_gt, valid_mask)
        let (matched_pred_ious, matched_gt_inds) =
            self.dynamic_k_matching(&cost_matrix, &pairwise_ious, num_gt, &mut valid_mask)?;

        // assigned_gt_inds[valid_mask] = matched_gt_inds + 1
        let _ = assigned_gt_inds.f_index_put_(
            &[Some(&valid_mask)],
            &matched_gt_inds.f_add_scalar(1)?,
            false,
        )?;
        // assigned_labels = assigned_gt_inds.new_full((num_bboxes, ), -1)
        let mut assigned_labels = Tensor::f_full([num_bboxes], -1, (Kind::Int64, dev))?;
        // assigned_labels[valid_mask] = gt_labels[matched_gt_inds].long()
        let _ = assigned_labels.f_index_put_(
            &[Some(&valid_mask)],
            &gt_labels
                .f_index(&[Some(&matched_gt_inds)])?
                .f_to_kind(Kind::Int64)?,
            false,
        )?;
        // max_overlaps = assigned_gt_inds.new_full((num_bboxes, ), -INF, dtype=torch.float32)
        let mut max_overlaps = Tensor::f_full([num_bboxes], -INF, (Kind::Float, dev))?;
        // max_overlaps[valid_mask] = matched_pred_ious
        let _ = max_overlaps.f_index_put_(&[Some(&valid_mask)], &matched_pred_ious, false)?;
        Ok(ImageResult {
            gt_inds: assigned_gt_inds,
            max_overlaps,
            labels: assigned_labels,
            assign_metrics: None,
        })
    }

    /// `dynamic_k_matching(cost, pairwise_ious, num_gt, valid_mask)`; updates `valid_mask` in
    /// place as the Python does.
    fn dynamic_k_matching(
        &self,
        cost: &Tensor,
        pairwise_ious: &Tensor,
        num_gt: i64,
        valid_mask: &mut Tensor,
    ) -> Result<(Tensor, Tensor)> {
        // matching_matrix = torch.zeros_like(cost, dtype=torch.uint8)
        let mut matching_matrix = Tensor::f_zeros(cost.size(), (Kind::Uint8, cost.device()))?;
        // candidate_topk = min(self.topk, pairwise_ious.size(0))
        let candidate_topk = self.topk.min(pairwise_ious.size()[0]);
        // topk_ious, _ = torch.topk(pairwise_ious, candidate_topk, dim=0)
        let (topk_ious, _) = pairwise_ious.f_topk(candidate_topk, 0, true, true)?;
        // dynamic_ks = torch.clamp(topk_ious.sum(0).int(), min=1)
        let dynamic_ks = topk_ious
            .f_sum_dim_intlist(0, false, None::<Kind>)?
            .f_to_kind(Kind::Int)?
            .f_clamp_min(1)?;
        // for gt_idx in range(num_gt):
        for gt_idx in 0..num_gt {
            // _, pos_idx = torch.topk(cost[:, gt_idx], k=dynamic_ks[gt_idx], largest=False)
            let k = dynamic_ks.f_int64_value(&[gt_idx])?; // the host read of `k=`
            let (_, pos_idx) = cost.f_select(1, gt_idx)?.f_topk(k, 0, false, true)?;
            // matching_matrix[:, gt_idx][pos_idx] = 1
            let _ = matching_matrix.f_select(1, gt_idx)?.f_index_put_(
                &[Some(&pos_idx)],
                &scalar(1, &matching_matrix)?,
                false,
            )?;
        }
        // prior_match_gt_mask = matching_matrix.sum(1) > 1
        let prior_match_gt_mask = matching_matrix
            .f_sum_dim_intlist(1, false, None::<Kind>)?
            .f_gt(1)?;
        // if prior_match_gt_mask.sum() > 0:
        if prior_match_gt_mask
            .f_sum(None::<Kind>)?
            .f_gt(0)?
            .f_int64_value(&[])?
            != 0
        {
            // cost_min, cost_argmin = torch.min(cost[prior_match_gt_mask, :], dim=1)
            let (_cost_min, cost_argmin) = cost
                .f_index(&[Some(&prior_match_gt_mask)])?
                .f_min_dim(1, false)?;
            // matching_matrix[prior_match_gt_mask, :] *= 0
            let mut rows = matching_matrix.f_index(&[Some(&prior_match_gt_mask)])?;
            let _ = rows.f_mul_scalar_(0)?;
            let _ = matching_matrix.f_index_put_(&[Some(&prior_match_gt_mask)], &rows, false)?;
            // matching_matrix[prior_match_gt_mask, cost_argmin] = 1
            let _ = matching_matrix.f_index_put_(
                &[Some(&prior_match_gt_mask), Some(&cost_argmin)],
                &scalar(1, &matching_matrix)?,
                false,
            )?;
        }
        // fg_mask_inboxes = matching_matrix.sum(1) > 0
        let fg_mask_inboxes = matching_matrix
            .f_sum_dim_intlist(1, false, None::<Kind>)?
            .f_gt(0)?;
        // valid_mask[valid_mask.clone()] = fg_mask_inboxes
        let before = valid_mask.copy();
        let _ = valid_mask.f_index_put_(&[Some(&before)], &fg_mask_inboxes, false)?;
        // matched_gt_inds = matching_matrix[fg_mask_inboxes, :].argmax(1)
        let matched_gt_inds = matching_matrix
            .f_index(&[Some(&fg_mask_inboxes)])?
            .f_argmax(1, false)?;
        // matched_pred_ious = (matching_matrix * pairwise_ious).sum(1)[fg_mask_inboxes]
        let matched_pred_ious = matching_matrix
            .f_mul(pairwise_ious)?
            .f_sum_dim_intlist(1, false, None::<Kind>)?
            .f_index(&[Some(&fg_mask_inboxes)])?;
        Ok((matched_pred_ious, matched_gt_inds))
    }
}

/// `TaskAlignedAssigner(topk)`.
pub struct TaskAligned {
    pub topk: i64,
}

impl TaskAligned {
    /// `assign(pred_instances, gt_instances, alpha=alpha, beta=beta)` (ints, as TOODHead passes
    /// its `train_cfg`'s).
    #[allow(clippy::too_many_arguments)]
    pub fn assign(
        &self,
        priors: &Tensor,
        decode_bboxes: &Tensor,
        pred_scores: &Tensor,
        gt_bboxes: &Tensor,
        gt_labels: &Tensor,
        alpha: i64,
        beta: i64,
    ) -> Result<ImageResult> {
        // priors = priors[:, :4]
        let priors = priors.f_narrow(1, 0, 4)?;
        // num_gt, num_bboxes = gt_bboxes.size(0), priors.size(0)
        let (num_gt, num_bboxes) = (gt_bboxes.size()[0], priors.size()[0]);
        let dev = priors.device();
        // overlaps = self.iou_calculator(decode_bboxes, gt_bboxes).detach()
        let overlaps = bbox_overlaps(decode_bboxes, gt_bboxes, false)?.f_detach()?;
        // bbox_scores = pred_scores[:, gt_labels].detach()
        let bbox_scores = pred_scores.f_index(&[None, Some(gt_labels)])?.f_detach()?;
        // assigned_gt_inds = priors.new_full((num_bboxes, ), 0, dtype=torch.long)
        let mut assigned_gt_inds = Tensor::f_full([num_bboxes], 0, (Kind::Int64, dev))?;
        // assign_metrics = priors.new_zeros((num_bboxes, ))
        let mut assign_metrics = Tensor::f_zeros([num_bboxes], (priors.kind(), dev))?;
        // if num_gt == 0 or num_bboxes == 0: ... return
        if num_gt == 0 || num_bboxes == 0 {
            return Ok(ImageResult {
                max_overlaps: Tensor::f_zeros([num_bboxes], (priors.kind(), dev))?,
                labels: Tensor::f_full([num_bboxes], -1, (Kind::Int64, dev))?,
                gt_inds: assigned_gt_inds,
                assign_metrics: Some(assign_metrics),
            });
        }
        // alignment_metrics = bbox_scores**alpha * overlaps**beta
        let alignment_metrics = bbox_scores
            .f_pow_tensor_scalar(alpha)?
            .f_mul(&overlaps.f_pow_tensor_scalar(beta)?)?;
        // topk = min(self.topk, alignment_metrics.size(0))
        let topk = self.topk.min(alignment_metrics.size()[0]);
        // _, candidate_idxs = alignment_metrics.topk(topk, dim=0, largest=True)
        let (_, candidate_idxs) = alignment_metrics.f_topk(topk, 0, true, true)?;
        // candidate_metrics = alignment_metrics[candidate_idxs, torch.arange(num_gt)]
        let candidate_metrics = alignment_metrics.f_index(&[
            Some(&candidate_idxs),
            Some(&Tensor::f_arange(num_gt, (Kind::Int64, dev))?),
        ])?;
        // is_pos = candidate_metrics > 0
        let is_pos = candidate_metrics.f_gt(0)?;

        // priors_cx = (priors[:, 0] + priors[:, 2]) / 2.0
        let priors_cx = priors
            .f_select(1, 0)?
            .f_add(&priors.f_select(1, 2)?)?
            .f_div_scalar(2.0)?;
        // priors_cy = (priors[:, 1] + priors[:, 3]) / 2.0
        let priors_cy = priors
            .f_select(1, 1)?
            .f_add(&priors.f_select(1, 3)?)?
            .f_div_scalar(2.0)?;
        // for gt_idx in range(num_gt):
        //     candidate_idxs[:, gt_idx] += gt_idx * num_bboxes
        for gt_idx in 0..num_gt {
            let _ = candidate_idxs
                .f_select(1, gt_idx)?
                .f_add_scalar_(gt_idx * num_bboxes)?;
        }
        // ep_priors_cx = priors_cx.view(1, -1).expand(num_gt, num_bboxes).contiguous().view(-1)
        let ep_priors_cx = priors_cx
            .f_view([1, -1])?
            .f_expand([num_gt, num_bboxes], false)?
            .f_contiguous()?
            .f_view([-1])?;
        // ep_priors_cy = ... the same
        let ep_priors_cy = priors_cy
            .f_view([1, -1])?
            .f_expand([num_gt, num_bboxes], false)?
            .f_contiguous()?
            .f_view([-1])?;
        // candidate_idxs = candidate_idxs.view(-1)
        let candidate_idxs = candidate_idxs.f_view([-1])?;

        // l_ = ep_priors_cx[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 0]
        let side = |ep: &Tensor, j: i64, gt_minus: bool| -> Result<Tensor> {
            let p = ep.f_index(&[Some(&candidate_idxs)])?.f_view([-1, num_gt])?;
            let g = gt_bboxes.f_select(1, j)?;
            Ok(if gt_minus { g.f_sub(&p)? } else { p.f_sub(&g)? })
        };
        let l_ = side(&ep_priors_cx, 0, false)?;
        // t_ = ep_priors_cy[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 1]
        let t_ = side(&ep_priors_cy, 1, false)?;
        // r_ = gt_bboxes[:, 2] - ep_priors_cx[candidate_idxs].view(-1, num_gt)
        let r_ = side(&ep_priors_cx, 2, true)?;
        // b_ = gt_bboxes[:, 3] - ep_priors_cy[candidate_idxs].view(-1, num_gt)
        let b_ = side(&ep_priors_cy, 3, true)?;
        // is_in_gts = torch.stack([l_, t_, r_, b_], dim=1).min(dim=1)[0] > 0.01
        let is_in_gts = Tensor::f_stack(&[&l_, &t_, &r_, &b_], 1)?
            .f_min_dim(1, false)?
            .0
            .f_gt(0.01)?;
        // is_pos = is_pos & is_in_gts
        let is_pos = is_pos.f_logical_and(&is_in_gts)?;

        // overlaps_inf = torch.full_like(overlaps, -INF).t().contiguous().view(-1)
        let mut overlaps_inf = overlaps
            .f_full_like(-INF)?
            .f_tr()?
            .f_contiguous()?
            .f_view([-1])?;
        // index = candidate_idxs.view(-1)[is_pos.view(-1)]
        let index = candidate_idxs
            .f_view([-1])?
            .f_index(&[Some(&is_pos.f_view([-1])?)])?;
        // overlaps_inf[index] = overlaps.t().contiguous().view(-1)[index]
        let picked = overlaps
            .f_tr()?
            .f_contiguous()?
            .f_view([-1])?
            .f_index(&[Some(&index)])?;
        let _ = overlaps_inf.f_index_put_(&[Some(&index)], &picked, false)?;
        // overlaps_inf = overlaps_inf.view(num_gt, -1).t()
        let overlaps_inf = overlaps_inf.f_view([num_gt, -1])?.f_tr()?;

        // max_overlaps, argmax_overlaps = overlaps_inf.max(dim=1)
        let (max_overlaps, argmax_overlaps) = overlaps_inf.f_max_dim(1, false)?;
        // assigned_gt_inds[max_overlaps != -INF] = argmax_overlaps[max_overlaps != -INF] + 1
        let _ = assigned_gt_inds.f_index_put_(
            &[Some(&max_overlaps.f_ne(-INF)?)],
            &argmax_overlaps
                .f_index(&[Some(&max_overlaps.f_ne(-INF)?)])?
                .f_add_scalar(1)?,
            false,
        )?;
        // assign_metrics[max_overlaps != -INF] = alignment_metrics[
        //     max_overlaps != -INF, argmax_overlaps[max_overlaps != -INF]]
        let _ = assign_metrics.f_index_put_(
            &[Some(&max_overlaps.f_ne(-INF)?)],
            &alignment_metrics.f_index(&[
                Some(&max_overlaps.f_ne(-INF)?),
                Some(&argmax_overlaps.f_index(&[Some(&max_overlaps.f_ne(-INF)?)])?),
            ])?,
            false,
        )?;

        // assigned_labels = assigned_gt_inds.new_full((num_bboxes, ), -1)
        let mut assigned_labels = Tensor::f_full([num_bboxes], -1, (Kind::Int64, dev))?;
        // pos_inds = torch.nonzero(assigned_gt_inds > 0, as_tuple=False).squeeze()
        let pos_inds = assigned_gt_inds.f_gt(0)?.f_nonzero()?.f_squeeze()?;
        // if pos_inds.numel() > 0:
        if pos_inds.numel() > 0 {
            // assigned_labels[pos_inds] = gt_labels[assigned_gt_inds[pos_inds] - 1]
            let of = assigned_gt_inds
                .f_index(&[Some(&pos_inds)])?
                .f_sub_scalar(1)?;
            let _ = assigned_labels.f_index_put_(
                &[Some(&pos_inds)],
                &gt_labels.f_index(&[Some(&of)])?,
                false,
            )?;
        }
        Ok(ImageResult {
            gt_inds: assigned_gt_inds,
            max_overlaps,
            labels: assigned_labels,
            assign_metrics: Some(assign_metrics),
        })
    }
}
