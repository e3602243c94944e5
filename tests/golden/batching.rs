//! The batched pipeline against itself: a batch of images with padded ground truths gives each
//! image what the image alone gives, chunking over ground truths changes nothing, and the
//! device-mode random sampler draws what it should.

use tch::{Device, Kind, Tensor};
use tch_detloss::dense_heads::{DenseHeadTargets, HeadTargets, ImageMeta};
use tch_detloss::task_modules::{
    ATSSAssigner, AssignResult, GtBatch, MaxIoUAssigner, RandomSampler, Sampler,
};

/// Random xyxy boxes inside a `size` square, `n` of them, deterministic from the global seed.
fn boxes(n: i64, size: f64) -> Tensor {
    let xy = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * (size * 0.8);
    let wh = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * (size * 0.4) + 4.0;
    Tensor::cat(&[&xy, &(&xy + wh).clamp_max(size)], 1)
}

fn images() -> (Vec<Tensor>, Vec<Tensor>, Vec<ImageMeta>) {
    tch::manual_seed(7);
    let counts = [3i64, 0, 7, 1];
    let b: Vec<Tensor> = counts.iter().map(|&n| boxes(n, 96.0)).collect();
    let l: Vec<Tensor> = counts
        .iter()
        .map(|&n| Tensor::randint(3, [n], (Kind::Int64, Device::Cpu)))
        .collect();
    let metas = vec![
        ImageMeta {
            img_shape: (92, 90),
            pad_shape: (96, 96),
        },
        ImageMeta {
            img_shape: (96, 96),
            pad_shape: (96, 96),
        },
        ImageMeta {
            img_shape: (60, 80),
            pad_shape: (64, 96),
        },
        ImageMeta {
            img_shape: (70, 96),
            pad_shape: (96, 96),
        },
    ];
    (b, l, metas)
}

fn same(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.size(), b.size(), "{what}: shape");
    assert!(a.equal(b), "{what}: values differ");
}

/// Image `i` of `batch` against image `j` of `other`.
fn check_assign(what: &str, batch: &AssignResult, i: i64, other: &AssignResult, j: i64) {
    let (gi, mo, la) = batch.image(i);
    let (gi1, mo1, la1) = other.image(j);
    same(&format!("{what} image {i} gt_inds"), &gi, &gi1);
    same(&format!("{what} image {i} max_overlaps"), &mo, &mo1);
    same(&format!("{what} image {i} labels"), &la, &la1);
}

const ATSS_HEAD: &str = r#"{"type": "ATSSHead", "num_classes": 3,
    "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 4,
        "scales_per_octave": 1, "strides": [8, 16, 32]},
    "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0, 0, 0, 0], "target_stds": [0.1, 0.1, 0.2, 0.2]},
    "train_cfg": {"assigner": {"type": "ATSSAssigner", "topk": 9}, "allowed_border": -1, "pos_weight": -1}}"#;

const RETINA_HEAD: &str = r#"{"type": "RetinaHead", "num_classes": 3,
    "anchor_generator": {"type": "AnchorGenerator", "octave_base_scale": 4, "scales_per_octave": 3,
        "ratios": [0.5, 1.0, 2.0], "strides": [8, 16, 32]},
    "train_cfg": {"assigner": {"type": "MaxIoUAssigner", "pos_iou_thr": 0.5, "neg_iou_thr": 0.4, "min_pos_iou": 0.0},
        "allowed_border": 0, "pos_weight": 2.0}}"#;

fn targets(
    head: &DenseHeadTargets,
    b: &[Tensor],
    l: &[Tensor],
    metas: &[ImageMeta],
) -> HeadTargets {
    let gts = GtBatch::pad(b, l).unwrap();
    head.get_targets(&[(12, 12), (6, 6), (3, 3)], metas, &gts, None, Device::Cpu)
        .unwrap()
}

#[test]
fn head_targets_of_a_batch_are_those_of_each_image() {
    let (b, l, metas) = images();
    for cfg in [ATSS_HEAD, RETINA_HEAD] {
        let head = DenseHeadTargets::from_config(&serde_json::from_str(cfg).unwrap()).unwrap();
        let batch = targets(&head, &b, &l, &metas);
        let mut factor = 0.0;
        for i in 0..b.len() {
            let alone = targets(&head, &b[i..=i], &l[i..=i], &metas[i..=i]);
            let i64_ = i as i64;
            same("labels", &batch.labels.get(i64_), &alone.labels.get(0));
            same(
                "label_weights",
                &batch.label_weights.get(i64_),
                &alone.label_weights.get(0),
            );
            same(
                "bbox_targets",
                &batch.bbox_targets.get(i64_),
                &alone.bbox_targets.get(0),
            );
            same(
                "bbox_weights",
                &batch.bbox_weights.get(i64_),
                &alone.bbox_weights.get(0),
            );
            check_assign("head", &batch.assign, i64_, &alone.assign, 0);
            factor += alone.avg_factor.double_value(&[]);
        }
        // Σ_images max(#pos_i, 1): the image without ground truths adds 1.
        assert_eq!(batch.avg_factor.double_value(&[]), factor);
        assert!(
            batch
                .sampling
                .pos_counts()
                .sum(Kind::Int64)
                .int64_value(&[])
                > 0,
            "no positives at all"
        );
    }
}

#[test]
fn chunking_over_ground_truths_changes_nothing() {
    let (b, l, _) = images();
    let gts = GtBatch::pad(&b, &l).unwrap();
    let priors = Tensor::cat(&[boxes(150, 96.0), boxes(40, 96.0)], 0);
    let mut atss =
        ATSSAssigner::from_config(&serde_json::json!({"type": "ATSSAssigner", "topk": 9})).unwrap();
    let whole = atss.assign(&priors, &[150, 40], &gts, None, None).unwrap();
    atss.chunk_elements = 1; // one ground truth at a time
    let chunked = atss.assign(&priors, &[150, 40], &gts, None, None).unwrap();
    for i in 0..4 {
        check_assign("ATSS chunked", &chunked, i, &whole, i);
    }
    let mut maxiou = MaxIoUAssigner::from_config(&serde_json::json!({"type": "MaxIoUAssigner",
        "pos_iou_thr": 0.5, "neg_iou_thr": 0.4, "min_pos_iou": 0.0}))
    .unwrap();
    let whole = maxiou.assign(&priors, &gts, None, None).unwrap();
    maxiou.chunk_elements = 2 * 190 * 4; // two ground truths at a time
    let chunked = maxiou.assign(&priors, &gts, None, None).unwrap();
    for i in 0..4 {
        check_assign("MaxIoU chunked", &chunked, i, &whole, i);
    }
}

#[test]
fn device_mode_random_sampler_draws_uniformly_within_its_bounds() {
    let _guard = super::RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(11);
    // Image 0: 10 positives, 50 negatives, 40 ignored; image 1: 2 positives, 98 negatives.
    let row0 = Tensor::cat(
        &[
            Tensor::ones([10], (Kind::Int64, Device::Cpu)),
            Tensor::zeros([50], (Kind::Int64, Device::Cpu)),
            Tensor::full([40], -1, (Kind::Int64, Device::Cpu)),
        ],
        0,
    );
    let row1 = Tensor::cat(
        &[
            Tensor::full([2], 2, (Kind::Int64, Device::Cpu)),
            Tensor::zeros([98], (Kind::Int64, Device::Cpu)),
        ],
        0,
    );
    let gt_inds = Tensor::stack(&[row0, row1], 0);
    let assign = AssignResult {
        num_gts: Tensor::from_slice(&[1i64, 2]),
        max_overlaps: gt_inds.zeros_like().to_kind(Kind::Float),
        labels: gt_inds.gt(0).to_kind(Kind::Int64) - 1,
        gt_inds,
    };
    let sampler =
        RandomSampler::from_config(&serde_json::json!({"type": "RandomSampler", "num": 16,
        "pos_fraction": 0.25, "neg_pos_ub": 3, "add_gt_as_proposals": false}))
        .unwrap();
    let mut hits = Tensor::zeros([2, 100], (Kind::Int64, Device::Cpu));
    let draws = 2000;
    for _ in 0..draws {
        let s = sampler.sample(&assign, None).unwrap();
        // Positives: min(#candidates, 16 * 0.25 = 4); negatives: min(16 - #pos, 3 * max(#pos, 1)).
        assert_eq!(Vec::<i64>::try_from(s.pos_counts()).unwrap(), [4, 2]);
        assert_eq!(Vec::<i64>::try_from(s.neg_counts()).unwrap(), [12, 6]);
        assert!(!bool::try_from(s.pos_mask.logical_and(&assign.gt_inds.le(0)).any()).unwrap());
        assert!(!bool::try_from(s.neg_mask.logical_and(&assign.gt_inds.ne(0)).any()).unwrap());
        hits += s.pos_mask.to_kind(Kind::Int64) + s.neg_mask.to_kind(Kind::Int64);
    }
    // Each candidate's share of the draws: 4 of 10 positives, 12 of 50 negatives (image 0);
    // within 5 standard deviations of a binomial.
    for (i, range, p) in [(0, 0..10, 0.4), (0, 10..60, 0.24), (1, 2..100, 6.0 / 98.0)] {
        for j in range {
            let k = hits.int64_value(&[i, j]) as f64;
            let (mean, sd) = (draws as f64 * p, (draws as f64 * p * (1.0 - p)).sqrt());
            assert!(
                (k - mean).abs() < 5.0 * sd,
                "image {i} prior {j}: drawn {k} times, expected {mean:.0} ± {sd:.0}"
            );
        }
    }
    assert_eq!(
        hits.int64_value(&[1, 0]),
        draws,
        "both positives of image 1 are always drawn"
    );
}
