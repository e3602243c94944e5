//! The CUDA kernels, run only when asked for: `cargo test --release --features gpu-tests` on a
//! machine with an NVIDIA GPU (sm_80 or newer).

use rstest::rstest;
use tch::{Device, Kind, Tensor};
use tch_detloss::golden::rel_err;
use tch_detloss::losses::FocalLoss;
use tch_detloss::{Loss, LossArgs, Reduction};

use crate::common::{check_variant, inputs, variant};

fn cuda() -> Device {
    assert!(tch::Cuda::is_available(), "gpu-tests needs a CUDA device");
    Device::Cuda(0)
}

/// The ground truths of the target tests: two boxes in image 0, one in image 1, on `d`.
fn two_images(d: Device) -> tch_detloss::task_modules::GtBatch {
    let boxes = [
        Tensor::from_slice(&[10.0f32, 12.0, 50.0, 60.0, 60.0, 20.0, 100.0, 90.0])
            .view([2, 4])
            .to_device(d),
        Tensor::from_slice(&[30.0f32, 30.0, 90.0, 70.0])
            .view([1, 4])
            .to_device(d),
    ];
    let labels = [
        Tensor::from_slice(&[0i64, 2]).to_device(d),
        Tensor::from_slice(&[1i64]).to_device(d),
    ];
    tch_detloss::task_modules::GtBatch::pad(&boxes, &labels).unwrap()
}

/// Every variant of `common::VARIANTS` on the GPU against the float64 composition on the CPU,
/// every dtype; one test per variant (`gpu::matches_unfused::<variant>`).
mod matches_unfused {
    use super::*;

    macro_rules! on_cuda {
        ($($name:ident)*) => {$(
            #[rstest]
            fn $name(#[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind) {
                check_variant(stringify!($name), kind, cuda());
            }
        )*};
    }

    for_each_variant!(on_cuda);
}

/// RetinaNet-sized input: fused CUDA against the float64 composition, and bitwise
/// reproducible from run to run (no atomics).
#[test]
fn cuda_large_and_deterministic() {
    let d = cuda();
    let (n, c) = (400_000, 80);
    let inp = inputs(variant("focal"), n, c, Kind::Float, false);
    let pred = inp.pred.to_device(d).set_requires_grad(true);
    let labels = inp.target.to_device(d);
    let w = Tensor::rand([n], (Kind::Float, d));
    let af = Tensor::from(1234.5f32).to_device(d);
    let loss = FocalLoss::default();
    let run = || {
        let l = loss
            .forward(
                &pred,
                (&labels).into(),
                &LossArgs::new().weight(&w).avg_factor(&af),
            )
            .unwrap();
        let g = Tensor::run_backward(&[&l], &[&pred], false, false).remove(0);
        (l, g)
    };
    let (l1, g1) = run();
    let (l2, g2) = run();
    assert!(l1.equal(&l2) && g1.equal(&g2), "not bitwise reproducible");
    let pred64 = inp.pred.to_kind(Kind::Double).set_requires_grad(true);
    let w64 = w.to_device(Device::Cpu).to_kind(Kind::Double);
    let want = loss
        .forward_unfused(
            &pred64,
            (&inp.target).into(),
            &LossArgs::new().weight(&w64).avg_factor(1234.5),
        )
        .unwrap();
    want.backward();
    assert!(rel_err(&l1.to_device(Device::Cpu), &want).unwrap() < 1e-5);
    assert!(rel_err(&g1.to_device(Device::Cpu), &pred64.grad()).unwrap() < 1e-5);
}

/// More than 2^32 elements take the 64-bit-index kernels.
#[test]
fn cuda_wide_index() {
    let d = cuda();
    let (n, c) = ((1i64 << 32) / 80 + 1000, 80);
    let pred = Tensor::randn([n, c], (Kind::BFloat16, d));
    let labels = Tensor::randint(c + 1, [n], (Kind::Int64, d));
    let loss = FocalLoss {
        reduction: Reduction::Sum,
        ..Default::default()
    };
    let whole = loss
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap()
        .to_kind(Kind::Double);
    let h = n / 2;
    let part = |s: i64, len: i64| {
        loss.forward(
            &pred.narrow(0, s, len),
            (&labels.narrow(0, s, len)).into(),
            &LossArgs::new(),
        )
        .unwrap()
        .to_kind(Kind::Double)
    };
    let split = part(0, h) + part(h, n - h);
    assert!(rel_err(&whole.to_device(Device::Cpu), &split.to_device(Device::Cpu)).unwrap() < 2e-2);
}

#[test]
fn tensors_on_different_devices_are_errors() {
    let d = cuda();
    let pred = Tensor::randn([6, 4], (Kind::Float, d));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
    let e = FocalLoss::default()
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap_err();
    assert!(format!("{e:#}").contains("device"), "{e:#}");
    let w = Tensor::ones([6], (Kind::Float, Device::Cpu));
    let labels = labels.to_device(d);
    let e = FocalLoss::default()
        .forward(&pred, (&labels).into(), &LossArgs::new().weight(&w))
        .unwrap_err();
    assert!(format!("{e:#}").contains("device"), "{e:#}");
}

/// On CUDA a label outside [0, C] cannot be reported without reading the device back; the
/// documented result is NaN for the rows concerned.
#[test]
fn cuda_bad_labels_give_nan() {
    let d = cuda();
    let pred = Tensor::randn([4, 3], (Kind::Float, d));
    let labels = Tensor::from_slice(&[0i64, 7, 2, 3]).to_device(d);
    let l = FocalLoss::default()
        .forward(
            &pred,
            (&labels).into(),
            &LossArgs::new().reduction(Reduction::None),
        )
        .unwrap()
        .to_device(Device::Cpu);
    let nan_rows = l.isnan().any_dim(1, false);
    assert_eq!(
        Vec::<bool>::try_from(nan_rows).unwrap(),
        vec![false, true, false, false]
    );
}

/// A fused forward and backward of every loss reads nothing back to the host: it runs with c10's
/// sync-debug mode set to error, in which a synchronizing operation (as the check below shows)
/// fails.
#[test]
fn fused_steps_never_synchronize() {
    use tch_detloss::cuda::{sync_debug, SyncDebugMode};
    let d = cuda();
    // Every variant of the table that MMDetection does not make read back, each with its
    // head's column count.
    let prepared: Vec<_> = crate::common::VARIANTS
        .iter()
        .filter(|v| !v.host_reads)
        .map(|v| {
            let name = v.name;
            let (n, c) = (257, crate::common::columns(v, 80));
            let loss = tch_detloss::registry::build_str(&crate::common::config(v, c)).unwrap();
            let inp = inputs(v, n, c, Kind::Float, false).to_device(d);
            // The last weight that is not all zeros: the zero-weight short-cut is decided on the
            // device too, but an all-zero (N,) weight that only the short-cut accepts is one
            // documented host read.
            let w = crate::common::weights(v, n, c)
                .into_iter()
                .rev()
                .find(|(name, _)| !name.contains("zeros"))
                .and_then(|(_, w)| w)
                .map(|w| w.to_kind(Kind::Float).to_device(d));
            // TripletLoss takes no avg_factor.
            let af = Tensor::from(17.0f32).to_device(d);
            let takes_af = loss
                .forward(
                    &inp.pred,
                    inp.target(),
                    &inp.args(LossArgs::new().avg_factor(&af)),
                )
                .is_ok();
            (name, loss, inp, w, takes_af.then_some(af))
        })
        .collect();
    // One call of each first: CrossEntropyLoss copies its class_weight to the device then (once).
    for (_, loss, inp, w, _) in &prepared {
        let mut args = LossArgs::new();
        if let Some(w) = w {
            args = args.weight(w);
        }
        let _ = loss
            .forward(&inp.pred, inp.target(), &inp.args(args))
            .unwrap();
    }
    tch::Cuda::synchronize(0);
    {
        let _guard = sync_debug(SyncDebugMode::Error).unwrap();
        let probe = Tensor::ones([1], (Kind::Float, d));
        assert!(
            probe.f_double_value(&[0]).is_err(),
            "sync-debug mode is not in force"
        );
        for (name, loss, inp, w, af) in &prepared {
            let pred = inp.pred.detach().set_requires_grad(true);
            let mut args = LossArgs::new();
            if let Some(af) = af {
                args = args.avg_factor(af);
            }
            if let Some(w) = w {
                args = args.weight(w);
            }
            let l = loss
                .forward(&pred, inp.target(), &inp.args(args))
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let g = Tensor::f_run_backward(&[&l], &[&pred], false, false)
                .unwrap_or_else(|e| panic!("{name} backward: {e}"));
            drop(g);
        }
    }
    tch::Cuda::synchronize(0);
}

/// The batched targets (ATSS and MaxIoU assignment, the pseudo and the device-mode random
/// sampler) and a training step's three ATSS losses over them read nothing back either.
#[test]
fn head_targets_and_losses_never_synchronize() {
    use tch_detloss::cuda::{sync_debug, SyncDebugMode};
    use tch_detloss::dense_heads::{DenseHeadTargets, ImageMeta};
    let d = cuda();
    let anchor_cfg = serde_json::json!({"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 4,
        "scales_per_octave": 1, "strides": [8, 16, 32]});
    let atss = DenseHeadTargets::from_config(&serde_json::json!({"type": "ATSSHead", "num_classes": 3,
        "anchor_generator": anchor_cfg, "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_stds": [0.1, 0.1, 0.2, 0.2]},
        "train_cfg": {"assigner": {"type": "ATSSAssigner", "topk": 9}, "allowed_border": -1, "pos_weight": -1}}))
    .unwrap();
    let rpn = DenseHeadTargets::from_config(&serde_json::json!({"type": "AnchorHead", "num_classes": 1,
        "anchor_generator": anchor_cfg,
        "train_cfg": {"assigner": {"type": "MaxIoUAssigner", "pos_iou_thr": 0.7, "neg_iou_thr": 0.3, "min_pos_iou": 0.3},
            "sampler": {"type": "RandomSampler", "num": 64, "pos_fraction": 0.5, "add_gt_as_proposals": false},
            "allowed_border": 0, "pos_weight": -1}}))
    .unwrap();
    let metas = vec![
        ImageMeta {
            img_shape: (120, 100),
            pad_shape: (128, 128)
        };
        2
    ];
    let sizes = [(16, 16), (8, 8), (4, 4)];
    let (anchors, valid, counts) = atss.anchors(&sizes, &metas, d).unwrap();
    let gts = two_images(d);
    let n = anchors.size()[0];
    let focal =
        tch_detloss::registry::build_str(r#"{"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}"#)
            .unwrap();
    let giou =
        tch_detloss::registry::build_str(r#"{"type": "GIoULoss", "loss_weight": 2.0}"#).unwrap();
    let ce =
        tch_detloss::registry::build_str(r#"{"type": "CrossEntropyLoss", "use_sigmoid": true}"#)
            .unwrap();
    let cls = Tensor::randn([2 * n, 3], (Kind::Float, d)).set_requires_grad(true);
    let reg = (Tensor::randn([2 * n, 4], (Kind::Float, d)) * 0.1).set_requires_grad(true);
    let ctr = Tensor::randn([2 * n], (Kind::Float, d)).set_requires_grad(true);
    tch::Cuda::synchronize(0);
    let _guard = sync_debug(SyncDebugMode::Error).unwrap();
    let t = atss
        .targets_for(&anchors, &counts, &valid, &metas, &gts, None)
        .unwrap();
    let _ = rpn
        .targets_for(&anchors, &counts, &valid, &metas, &gts, None)
        .unwrap();
    let pos = t.sampling.pos_mask.reshape([-1]);
    let a = t.anchors.reshape([-1, 4]);
    let bt = t.bbox_targets.reshape([-1, 4]);
    let ctr_t = t.centerness.reshape([-1]);
    let decoded = atss.bbox_coder.decode(&a, &reg, None).unwrap();
    let lw = t.label_weights.reshape([-1]);
    let l1 = focal
        .forward(
            &cls,
            (&t.labels.reshape([-1])).into(),
            &LossArgs::new().weight(&lw).avg_factor(&t.avg_factor),
        )
        .unwrap();
    let l2 = giou
        .forward(
            &decoded,
            (&bt).into(),
            &LossArgs::new().weight(&ctr_t).avg_factor(1.0),
        )
        .unwrap()
        / ctr_t.sum(Kind::Float).clamp_min(1.0);
    let pw = pos.to_kind(Kind::Float);
    let l3 = ce
        .forward(
            &ctr,
            (&ctr_t).into(),
            &LossArgs::new().weight(&pw).avg_factor(&t.avg_factor),
        )
        .unwrap();
    let g = Tensor::f_run_backward(&[&(l1 + l2 + l3)], &[&cls, &reg, &ctr], false, false).unwrap();
    drop(g);
    drop(_guard);
    tch::Cuda::synchronize(0);
}

/// FCOS's points, targets (center sampling, chunked over the ground truths as well) and its
/// three losses over all points read nothing back.
#[test]
fn fcos_targets_and_losses_never_synchronize() {
    use tch_detloss::cuda::{sync_debug, SyncDebugMode};
    use tch_detloss::dense_heads::FCOSHeadTargets;
    let d = cuda();
    let mut head =
        FCOSHeadTargets::from_config(&serde_json::json!({"type": "FCOSHead", "num_classes": 3,
        "strides": [8, 16, 32], "regress_ranges": [[-1, 64], [64, 128], [128, 100000000.0]],
        "center_sampling": true, "norm_on_bbox": true}))
        .unwrap();
    let gts = two_images(d);
    let (points, counts) = head
        .points(&[(16, 16), (8, 8), (4, 4)], Kind::Float, d)
        .unwrap();
    let n = points.size()[0];
    let focal =
        tch_detloss::registry::build_str(r#"{"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}"#)
            .unwrap();
    let giou = tch_detloss::registry::build_str(r#"{"type": "GIoULoss"}"#).unwrap();
    let ce =
        tch_detloss::registry::build_str(r#"{"type": "CrossEntropyLoss", "use_sigmoid": true}"#)
            .unwrap();
    let cls = Tensor::randn([2 * n, 3], (Kind::Float, d)).set_requires_grad(true);
    let reg = Tensor::rand([2, n, 4], (Kind::Float, d)).set_requires_grad(true);
    let ctr = Tensor::randn([2 * n], (Kind::Float, d)).set_requires_grad(true);
    tch::Cuda::synchronize(0);
    let _guard = sync_debug(SyncDebugMode::Error).unwrap();
    let t = head.targets(&points, &counts, &gts).unwrap();
    head.chunk_elements = 1;
    let chunked = head.targets(&points, &counts, &gts).unwrap();
    let (avg, denorm) = t.avg_factors().unwrap();
    let pw = t.pos_mask.to_kind(Kind::Float).reshape([-1]);
    let ctr_t = t.centerness.reshape([-1]);
    let l1 = focal
        .forward(
            &cls,
            (&t.labels.reshape([-1])).into(),
            &LossArgs::new().avg_factor(&avg),
        )
        .unwrap();
    let pred = head.decode(&points, &reg).unwrap().reshape([-1, 4]);
    let target = head
        .decode(&points, &t.bbox_targets)
        .unwrap()
        .reshape([-1, 4]);
    let l2 = giou
        .forward(
            &pred,
            (&target).into(),
            &LossArgs::new().weight(&ctr_t).avg_factor(&denorm),
        )
        .unwrap();
    let l3 = ce
        .forward(
            &ctr,
            (&ctr_t).into(),
            &LossArgs::new().weight(&pw).avg_factor(&avg),
        )
        .unwrap();
    let g = Tensor::f_run_backward(&[&(l1 + l2 + l3)], &[&cls, &reg, &ctr], false, false).unwrap();
    drop(g);
    drop(_guard);
    tch::Cuda::synchronize(0);
    assert!(t.labels.equal(&chunked.labels));
    assert!(t.bbox_targets.equal(&chunked.bbox_targets));
}

/// TOOD's and RTMDet's assigners over a batch, chunked over the ground truths too, read nothing
/// back.
#[test]
fn point_assigners_never_synchronize() {
    use tch_detloss::cuda::{sync_debug, SyncDebugMode};
    use tch_detloss::task_modules::{
        DynamicSoftLabelAssigner, MlvlPointGenerator, TaskAlignedAssigner,
    };
    let d = cuda();
    let gen = MlvlPointGenerator::from_config(
        &serde_json::json!({"type": "MlvlPointGenerator", "offset": 0, "strides": [8, 16, 32]}),
    )
    .unwrap();
    let priors = Tensor::cat(
        &gen.grid_priors(&[(16, 16), (8, 8), (4, 4)], Kind::Float, d, true)
            .unwrap(),
        0,
    );
    let n = priors.size()[0];
    let xy = priors.narrow(1, 0, 2).unsqueeze(0);
    let dist = Tensor::rand([2, n, 4], (Kind::Float, d)) * 20.0 + 1.0;
    let decoded = Tensor::cat(&[&xy - dist.narrow(2, 0, 2), &xy + dist.narrow(2, 2, 2)], 2);
    let scores = Tensor::randn([2, n, 3], (Kind::Float, d));
    let gts = two_images(d);
    let mut tal = TaskAlignedAssigner::from_config(
        &serde_json::json!({"type": "TaskAlignedAssigner", "topk": 13}),
    )
    .unwrap();
    let mut dsl = DynamicSoftLabelAssigner::from_config(
        &serde_json::json!({"type": "DynamicSoftLabelAssigner", "topk": 13}),
    )
    .unwrap();
    let anchors = Tensor::cat(&[&xy.squeeze_dim(0) - 16.0, &xy.squeeze_dim(0) + 16.0], 1);
    tch::Cuda::synchronize(0);
    let guard = sync_debug(SyncDebugMode::Error).unwrap();
    let a = tal
        .assign(&anchors, &decoded, &scores.sigmoid(), &gts, 1.0, 6.0, None)
        .unwrap();
    let b = dsl.assign(&priors, &decoded, &scores, &gts, None).unwrap();
    tal.chunk_elements = 1;
    dsl.chunk_elements = 1;
    let a1 = tal
        .assign(&anchors, &decoded, &scores.sigmoid(), &gts, 1.0, 6.0, None)
        .unwrap();
    let b1 = dsl.assign(&priors, &decoded, &scores, &gts, None).unwrap();
    drop(guard);
    tch::Cuda::synchronize(0);
    assert!(a.result.gt_inds.equal(&a1.result.gt_inds));
    assert!(b.gt_inds.equal(&b1.gt_inds));
}

/// RTMDet's targets and its QFL and GIoU losses over all priors read nothing back.
#[test]
fn rtmdet_targets_and_losses_never_synchronize() {
    use tch_detloss::cuda::{sync_debug, SyncDebugMode};
    use tch_detloss::dense_heads::{ImageMeta, RTMDetHeadTargets};
    let d = cuda();
    let head =
        RTMDetHeadTargets::from_config(&serde_json::json!({"type": "RTMDetHead", "num_classes": 3,
        "anchor_generator": {"type": "MlvlPointGenerator", "offset": 0, "strides": [8, 16, 32]},
        "train_cfg": {"assigner": {"type": "DynamicSoftLabelAssigner", "topk": 13},
                      "allowed_border": -1, "pos_weight": -1, "debug": false}}))
        .unwrap();
    let metas = vec![
        ImageMeta {
            img_shape: (120, 100),
            pad_shape: (128, 128)
        };
        2
    ];
    let (priors, valid, counts) = head.priors(&[(16, 16), (8, 8), (4, 4)], &metas, d).unwrap();
    let n = priors.size()[0];
    let gts = two_images(d);
    let qfl = tch_detloss::registry::build_str(
        r#"{"type": "QualityFocalLoss", "use_sigmoid": true, "beta": 2.0}"#,
    )
    .unwrap();
    let giou =
        tch_detloss::registry::build_str(r#"{"type": "GIoULoss", "loss_weight": 2.0}"#).unwrap();
    let cls = Tensor::randn([2, n, 3], (Kind::Float, d)).set_requires_grad(true);
    let dist = (Tensor::rand([2, n, 4], (Kind::Float, d)) * 30.0 + 2.0).set_requires_grad(true);
    tch::Cuda::synchronize(0);
    let _guard = sync_debug(SyncDebugMode::Error).unwrap();
    let decoded = head.decode(&priors, &dist).unwrap();
    let t = head
        .targets(&priors, &counts, &valid, &metas, &decoded, &cls, &gts)
        .unwrap();
    let (cls_avg, bbox_avg) = t.avg_factors().unwrap();
    let l1 = qfl
        .forward(
            &cls.reshape([-1, 3]),
            (&t.labels.reshape([-1]), &t.assign_metrics.reshape([-1])).into(),
            &LossArgs::new()
                .weight(&t.label_weights.reshape([-1]))
                .avg_factor(1.0),
        )
        .unwrap()
        / &cls_avg;
    let l2 = giou
        .forward(
            &decoded.reshape([-1, 4]),
            (&t.bbox_targets.reshape([-1, 4])).into(),
            &LossArgs::new()
                .weight(&t.assign_metrics.reshape([-1]))
                .avg_factor(1.0),
        )
        .unwrap()
        / &bbox_avg;
    let g = Tensor::f_run_backward(&[&(l1 + l2)], &[&cls, &dist], false, false).unwrap();
    drop(g);
    drop(_guard);
    tch::Cuda::synchronize(0);
}

/// GFL's loss inputs and its QFL, GIoU and DFL losses over all anchors read nothing back.
#[test]
fn gfl_loss_inputs_and_losses_never_synchronize() {
    use tch_detloss::cuda::{sync_debug, SyncDebugMode};
    use tch_detloss::dense_heads::{GFLHeadTargets, ImageMeta};
    let d = cuda();
    let head = GFLHeadTargets::from_config(&serde_json::json!({"type": "GFLHead", "num_classes": 3, "reg_max": 16,
        "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 8,
                             "scales_per_octave": 1, "strides": [8, 16, 32]},
        "train_cfg": {"assigner": {"type": "ATSSAssigner", "topk": 9}, "allowed_border": -1, "pos_weight": -1}}))
    .unwrap();
    let metas = vec![
        ImageMeta {
            img_shape: (120, 100),
            pad_shape: (128, 128)
        };
        2
    ];
    let gts = two_images(d);
    let (anchors, valid, counts) = head
        .targets
        .anchors(&[(16, 16), (8, 8), (4, 4)], &metas, d)
        .unwrap();
    let n = anchors.size()[0];
    let b = |s: &str| tch_detloss::registry::build_str(s).unwrap();
    let qfl = b(r#"{"type": "QualityFocalLoss", "use_sigmoid": true, "beta": 2.0}"#);
    let giou = b(r#"{"type": "GIoULoss", "loss_weight": 2.0}"#);
    let dfl = b(r#"{"type": "DistributionFocalLoss", "loss_weight": 0.25}"#);
    let cls = Tensor::randn([2, n, 3], (Kind::Float, d)).set_requires_grad(true);
    let reg = Tensor::randn([2, n, 68], (Kind::Float, d)).set_requires_grad(true);
    tch::Cuda::synchronize(0);
    let _guard = sync_debug(SyncDebugMode::Error).unwrap();
    let t = head
        .targets
        .targets_for(&anchors, &counts, &valid, &metas, &gts, None)
        .unwrap();
    let l = head.loss_inputs(&t, &cls, &reg).unwrap();
    let avg = tch_detloss::dist::reduce_mean(&t.avg_factor).unwrap();
    let bbox_avg = l.bbox_avg_factor().unwrap();
    let l1 = qfl
        .forward(
            &cls.reshape([-1, 3]),
            (&t.labels.reshape([-1]), &l.scores.reshape([-1])).into(),
            &LossArgs::new()
                .weight(&t.label_weights.reshape([-1]))
                .avg_factor(&avg),
        )
        .unwrap();
    let w = l.weights.reshape([-1]);
    let l2 = giou
        .forward(
            &l.pred_boxes.reshape([-1, 4]),
            (&l.target_boxes.reshape([-1, 4])).into(),
            &LossArgs::new().weight(&w).avg_factor(1.0),
        )
        .unwrap()
        / &bbox_avg;
    let w4 = w.unsqueeze(1).expand([-1, 4], false).reshape([-1]);
    let l3 = dfl
        .forward(
            &l.corner_logits.reshape([-1, 17]),
            (&l.corner_targets.reshape([-1])).into(),
            &LossArgs::new().weight(&w4).avg_factor(4.0),
        )
        .unwrap()
        / &bbox_avg;
    let g = Tensor::f_run_backward(&[&(l1 + l2 + l3)], &[&cls, &reg], false, false).unwrap();
    drop(g);
    drop(_guard);
    tch::Cuda::synchronize(0);
}

/// TOOD's alignment targets (per-ground-truth normalisation included) read nothing back.
#[test]
fn tood_targets_never_synchronize() {
    use tch_detloss::cuda::{sync_debug, SyncDebugMode};
    use tch_detloss::dense_heads::{ImageMeta, TOODHeadTargets};
    let d = cuda();
    let head = TOODHeadTargets::from_config(&serde_json::json!({"type": "TOODHead", "num_classes": 3,
        "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 8,
                             "scales_per_octave": 1, "strides": [8, 16, 32]},
        "train_cfg": {"initial_epoch": 4, "initial_assigner": {"type": "ATSSAssigner", "topk": 9},
                      "assigner": {"type": "TaskAlignedAssigner", "topk": 13}, "alpha": 1, "beta": 6,
                      "allowed_border": -1, "pos_weight": -1}}))
    .unwrap();
    let metas = vec![
        ImageMeta {
            img_shape: (120, 100),
            pad_shape: (128, 128)
        };
        2
    ];
    let (anchors, valid, counts) = head
        .anchors(&[(16, 16), (8, 8), (4, 4)], &metas, d)
        .unwrap();
    let n = anchors.size()[0];
    let jitter = Tensor::rand([2, n, 4], (Kind::Float, d)) * 4.0 - 2.0;
    let decoded = anchors.unsqueeze(0) + jitter;
    let scores = Tensor::rand([2, n, 3], (Kind::Float, d));
    let gts = two_images(d);
    tch::Cuda::synchronize(0);
    let guard = sync_debug(SyncDebugMode::Error).unwrap();
    let t = head
        .targets(&anchors, &counts, &valid, &metas, &decoded, &scores, &gts)
        .unwrap();
    drop(guard);
    tch::Cuda::synchronize(0);
    assert!(t.alignment_metrics.le(1.0).all().int64_value(&[]) == 1);
}

/// A CUDA trace of a fused forward and backward holds our kernels by name, next to the loss's
/// range and backward node.
#[test]
fn cuda_trace_names_our_kernels() {
    use tch_detloss::profiler::{Trace, TraceConfig};
    let d = cuda();
    let loss = FocalLoss::default();
    let pred = Tensor::randn([4096, 80], (Kind::Float, d)).set_requires_grad(true);
    let labels = Tensor::randint(81, [4096], (Kind::Int64, d));
    let _ = loss
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap();
    tch::Cuda::synchronize(0);
    let trace = Trace::start(TraceConfig::auto()).unwrap();
    loss.forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap()
        .backward();
    let summary = trace.stop(None).unwrap();
    let ours: Vec<_> = tch_detloss::testing::planned_kernel_names();
    let kernels: Vec<_> = summary
        .ops
        .iter()
        .filter(|o| o.device == "cuda" && ours.iter().any(|k| o.name.contains(k.as_str())))
        .map(|o| o.name.clone())
        .collect();
    assert!(
        kernels.len() >= 2,
        "forward and backward kernels in:\n{}",
        summary.table(40)
    );
    assert!(summary.op("FocalLoss").is_some() && summary.op("FocalLossBackward").is_some());
}

/// A fused FocalLoss forward+backward at the anchor head's shape (16 × 100,000 anchors × 80
/// classes) allocates at most one logits-sized buffer (the gradient) beyond its inputs.
#[test]
fn fused_focal_peak_memory_is_one_logits_buffer() {
    let d = cuda();
    let (n, c) = (16 * 100_000, 80);
    let loss = FocalLoss::default();
    let pred = Tensor::randn([n, c], (Kind::Float, d)).set_requires_grad(true);
    let labels = Tensor::randint(c + 1, [n], (Kind::Int64, d));
    let weights = Tensor::ones([n], (Kind::Float, d));
    let af = Tensor::from(1000.0f32).to_device(d);
    let step = || {
        let l = loss
            .forward(
                &pred,
                (&labels).into(),
                &LossArgs::new().weight(&weights).avg_factor(&af),
            )
            .unwrap();
        Tensor::f_run_backward(&[&l], &[&pred], false, false).unwrap()
    };
    drop(step()); // the kernels' module and the allocator's first blocks
    tch::Cuda::synchronize(0);
    let before = tch_detloss::cuda::memory_stats(0).unwrap().allocated;
    assert!(tch_detloss::cuda::reset_peak_allocated(0));
    let g = step();
    tch::Cuda::synchronize(0);
    let peak = tch_detloss::cuda::memory_stats(0).unwrap().allocated_peak;
    let logits = (n * c * 4) as u64;
    // The gradient, plus the reduction's partials and the scalar loss (well under 1 MiB).
    assert!(
        peak - before <= logits + (1 << 20),
        "peak {} above {} with logits of {}",
        peak,
        before,
        logits
    );
    drop(g);
}
