//! The reference cases of MMDetection 3.3's `MlvlPointGenerator` and `DistancePointBBoxCoder`
//! (tests/data/point_cases.json, made by tests/data/gen_point_cases.py) pass through the config
//! API: integers and masks equal, floats equal to the bit (the same operations in the same
//! order and dtype).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde_json::Value;
use tch::Device;
use tch_detloss::task_modules::{build, MaxShape, TaskModule};

use super::data_dir;
use super::pipeline::{assert_same, input, kind_of, output, pairs};

static CASES: LazyLock<Vec<Value>> = LazyLock::new(|| {
    let text =
        std::fs::read_to_string(data_dir().join("point_cases.json")).expect("point_cases.json");
    let v: Value = serde_json::from_str(&text).expect("valid JSON");
    v["cases"].as_array().expect("cases").clone()
});

fn family(name: &str) -> Vec<&'static Value> {
    CASES.iter().filter(|c| c["family"] == name).collect()
}

#[test]
fn point_case_counts() {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for c in CASES.iter() {
        *counts
            .entry(c["family"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let want: BTreeMap<String, usize> = [
        ("MlvlPointGenerator", 10),
        ("DistancePointBBoxCoder.encode", 10),
        ("DistancePointBBoxCoder.decode", 26),
        ("FCOSHead", 6),
        ("TaskAlignedAssigner", 12),
        ("DynamicSoftLabelAssigner", 7),
        ("RTMDetHead", 2),
        ("GFLHead", 1),
        ("TOODHead", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(counts, want);
}

#[test]
fn mlvl_point_generator() {
    let mut sparse = 0;
    for case in family("MlvlPointGenerator") {
        let name = case["name"].as_str().unwrap();
        let TaskModule::MlvlPointGenerator(gen) = build(&case["config"]).unwrap() else {
            panic!("{name}: not a point generator");
        };
        let a = &case["args"];
        let sizes = pairs(&a["featmap_sizes"]);
        let pad = pairs(&Value::Array(vec![a["pad_shape"].clone()]))[0];
        let kind = kind_of(a["dtype"].as_str().unwrap());
        for with_stride in [false, true] {
            let got = gen
                .grid_priors(&sizes, kind, Device::Cpu, with_stride)
                .unwrap();
            for (i, p) in got.iter().enumerate() {
                let key = format!(
                    "priors{}.level{i}",
                    if with_stride { "_stride" } else { "" }
                );
                assert_same(&format!("{name} {key}"), p, &output(case, &key), 0.0);
            }
        }
        let flags = gen.valid_flags(&sizes, pad, Device::Cpu).unwrap();
        for (i, f) in flags.iter().enumerate() {
            let key = format!("valid_flags.level{i}");
            assert_same(&format!("{name} {key}"), f, &output(case, &key), 0.0);
        }
        for (i, &hw) in sizes.iter().enumerate() {
            let key = format!("prior_idxs.level{i}");
            if case["inputs"].get(&key).is_none() {
                continue;
            }
            let got = gen.sparse_priors(&input(case, &key), hw, i, kind).unwrap();
            let key = format!("sparse_priors.level{i}");
            assert_same(&format!("{name} {key}"), &got, &output(case, &key), 0.0);
            sparse += 1;
        }
    }
    // Every case with a non-empty level has its sparse points.
    assert_eq!(sparse, 24, "sparse_priors levels checked");
}

#[test]
fn distance_point_bbox_coder() {
    for case in family("DistancePointBBoxCoder.encode") {
        let name = case["name"].as_str().unwrap();
        let TaskModule::DistancePointBBoxCoder(coder) = build(&case["config"]).unwrap() else {
            panic!("{name}: not a distance coder");
        };
        let a = &case["args"];
        let got = coder
            .encode(
                &input(case, "points"),
                &input(case, "gt_bboxes"),
                a["max_dis"].as_f64(),
                a["eps"].as_f64().unwrap(),
            )
            .unwrap();
        assert_same(name, &got, &output(case, "distances"), 0.0);
    }
    for case in family("DistancePointBBoxCoder.decode") {
        let name = case["name"].as_str().unwrap();
        let TaskModule::DistancePointBBoxCoder(coder) = build(&case["config"]).unwrap() else {
            panic!("{name}: not a distance coder");
        };
        let per_image: Vec<(i64, i64)>;
        let max_shape = match &case["args"]["max_shape"] {
            Value::Array(s) if s[0].is_array() => {
                per_image = pairs(&case["args"]["max_shape"]);
                Some(MaxShape::PerImage(&per_image))
            }
            Value::Array(s) => Some(MaxShape::Image(
                s[0].as_i64().unwrap(),
                s[1].as_i64().unwrap(),
            )),
            _ => None,
        };
        let got = coder
            .decode(
                &input(case, "points"),
                &input(case, "pred_bboxes"),
                max_shape,
            )
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_same(name, &got, &output(case, "decoded_bboxes"), 0.0);
    }
}

#[test]
fn point_modules_reject_bad_inputs() {
    use serde_json::json;
    use tch::{Kind, Tensor};
    use tch_detloss::task_modules::{bbox2distance, distance2bbox, MlvlPointGenerator};
    let err = |r: anyhow::Result<Tensor>| format!("{:#}", r.expect_err("an error"));
    let gen =
        MlvlPointGenerator::from_config(&json!({"type": "MlvlPointGenerator", "strides": [8]}))
            .unwrap();
    let e = gen
        .grid_priors(&[(2, 2), (1, 1)], Kind::Float, Device::Cpu, false)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("2 feature map sizes for 1 point levels"),
        "{e}"
    );
    let e = gen
        .grid_priors(&[(2, 2)], Kind::Int64, Device::Cpu, false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("floating kind"), "{e}");
    let e = gen
        .grid_priors(&[(-1, 2)], Kind::Float, Device::Cpu, false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("negative"), "{e}");
    let idx = Tensor::from_slice(&[0.0f32]);
    let e = err(gen.sparse_priors(&idx, (2, 2), 0, Kind::Float));
    assert!(e.contains("int64 indices"), "{e}");
    let e = err(gen.sparse_priors(&idx.to_kind(Kind::Int64), (2, 2), 3, Kind::Float));
    assert!(e.contains("no level 3"), "{e}");
    for bad in [
        json!({"type": "MlvlPointGenerator", "strides": []}),
        json!({"type": "MlvlPointGenerator", "strides": [0]}),
        json!({"type": "MlvlPointGenerator", "strides": [8], "center_offset": 0.5}),
        json!({"type": "DistancePointBBoxCoder", "use_box_type": true}),
    ] {
        assert!(build(&bad).is_err(), "{bad} was accepted");
    }
    let p = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
    let e = err(bbox2distance(
        &p,
        &Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)),
        None,
        0.1,
    ));
    assert!(e.contains("need (N, 2) with (N, 4)"), "{e}");
    let e = err(distance2bbox(
        &p.to_kind(Kind::Int64),
        &Tensor::zeros([3, 4], (Kind::Int64, Device::Cpu)),
        None,
    ));
    assert!(e.contains("floating point"), "{e}");
    let e = err(distance2bbox(
        &Tensor::zeros([2, 3, 2], (Kind::Float, Device::Cpu)),
        &Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu)),
        Some(MaxShape::PerImage(&[(4, 4)])),
    ));
    assert!(e.contains("1 max shapes"), "{e}");
}

/// A head case's image metas (`[[img_shape], [pad_shape]]` per image).
fn case_metas(case: &Value) -> Vec<tch_detloss::dense_heads::ImageMeta> {
    case["args"]["metas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = pairs(m);
            tch_detloss::dense_heads::ImageMeta {
                img_shape: p[0],
                pad_shape: p[1],
            }
        })
        .collect()
}

/// A head output given per level as `(B, c, H, W)`, flattened as `loss_by_feat` does:
/// `(B, N, c)`, levels concatenated.
fn head_outputs(case: &Value, key: &str, levels: usize, images: i64, c: i64) -> tch::Tensor {
    let parts: Vec<tch::Tensor> = (0..levels)
        .map(|l| {
            input(case, &format!("{key}.level{l}"))
                .permute([0, 2, 3, 1])
                .reshape([images, -1, c])
        })
        .collect();
    tch::Tensor::cat(&parts, 1)
}

/// A head case's ground truths, image by image and padded into one batch.
fn head_case_gts(
    case: &Value,
    images: i64,
) -> (
    Vec<tch::Tensor>,
    Vec<tch::Tensor>,
    tch_detloss::task_modules::GtBatch,
) {
    let boxes: Vec<tch::Tensor> = (0..images)
        .map(|j| input(case, &format!("gt_bboxes.img{j}")))
        .collect();
    let labels: Vec<tch::Tensor> = (0..images)
        .map(|j| input(case, &format!("gt_labels.img{j}")))
        .collect();
    let gts = tch_detloss::task_modules::GtBatch::pad(&boxes, &labels).unwrap();
    (boxes, labels, gts)
}

/// Our `(B, N, ...)` over all points in MMDetection's flatten order: level by level, each level
/// image by image.
fn mmdet_order(t: &tch::Tensor, counts: &[i64]) -> tch::Tensor {
    let parts: Vec<tch::Tensor> = t
        .split_with_sizes(counts, 1)
        .iter()
        .map(|l| l.flatten(0, 1))
        .collect();
    tch::Tensor::cat(&parts, 0)
}

#[test]
fn fcos_head_targets() {
    use tch_detloss::dense_heads::FCOSHeadTargets;
    use tch_detloss::task_modules::GtBatch;
    let cases = family("FCOSHead");
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let head = FCOSHeadTargets::from_config(&case["config"])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let a = &case["args"];
        let sizes = pairs(&a["featmap_sizes"]);
        let kind = kind_of(a["dtype"].as_str().unwrap());
        let images = a["images"].as_i64().unwrap();
        let (points, counts) = head.points(&sizes, kind, Device::Cpu).unwrap();
        let (boxes, labels, gts) = head_case_gts(case, images);
        // Batched against image by image (each image's own padding).
        let batch = head.targets(&points, &counts, &gts).unwrap();
        for j in 0..images as usize {
            let one = GtBatch::pad(&boxes[j..=j], &labels[j..=j]).unwrap();
            let alone = head.targets(&points, &counts, &one).unwrap();
            assert!(
                alone.labels.get(0).equal(&batch.labels.get(j as i64))
                    && alone
                        .bbox_targets
                        .get(0)
                        .equal(&batch.bbox_targets.get(j as i64)),
                "{name}: image {j} alone differs from its row of the batch"
            );
        }
        // Chunked over the ground truths (one at a time) and not: the same targets.
        for chunk in [head.chunk_elements, 1] {
            let mut head = FCOSHeadTargets::from_config(&case["config"]).unwrap();
            head.chunk_elements = chunk;
            let t = head
                .targets(&points, &counts, &gts)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let what = |k: &str| format!("{name} (chunk {chunk}) {k}");
            for (l, (lab, tgt)) in t
                .levels(&t.labels)
                .unwrap()
                .iter()
                .zip(t.levels(&t.bbox_targets).unwrap())
                .enumerate()
            {
                let key = format!("labels.level{l}");
                assert_same(&what(&key), &lab.flatten(0, 1), &output(case, &key), 0.0);
                let key = format!("bbox_targets.level{l}");
                assert_same(&what(&key), &tgt.flatten(0, 1), &output(case, &key), 0.0);
            }
            assert_same(
                &what("flatten_labels"),
                &mmdet_order(&t.labels, &counts),
                &output(case, "flatten_labels"),
                0.0,
            );
            let (avg, denorm) = t.avg_factors().unwrap();
            assert_same(
                &what("num_pos"),
                &avg.to_kind(tch::Kind::Double),
                &output(case, "num_pos"),
                0.0,
            );
            let pos = mmdet_order(&t.pos_mask, &counts);
            if case["outputs"].get("centerness_denorm").is_none() {
                assert_eq!(pos.sum(tch::Kind::Int64).int64_value(&[]), 0, "{name}");
                continue;
            }
            let ctr = mmdet_order(&t.centerness, &counts).masked_select(&pos);
            assert_same(
                &what("pos_centerness_targets"),
                &ctr,
                &output(case, "pos_centerness_targets"),
                0.0,
            );
            // The one value not to the bit: MMDetection sums the P positives' targets as a
            // compacted vector, we sum them masked in place (no host read to compact), so the
            // float sums round in another order; both are within P units in the last place of
            // the exact sum, hence of each other within 2 P.
            let p = ctr.size()[0] as f64;
            assert_same(
                &what("centerness_denorm"),
                &denorm,
                &output(case, "centerness_denorm"),
                2.0 * p,
            );
            let decoded = head.decode(&points, &t.bbox_targets).unwrap();
            let decoded =
                mmdet_order(&decoded, &counts).index_select(0, &pos.nonzero().squeeze_dim(1));
            assert_same(
                &what("pos_decoded_target_preds"),
                &decoded,
                &output(case, "pos_decoded_target_preds"),
                0.0,
            );
        }
    }
}

/// The single-image assigner cases `names` (each with `_dtype`) as one batch: the cases, their
/// padded ground truths and their stacked `(B, ...)` inputs by name.
fn assigner_batch<'a>(
    cases: &[&'a Value],
    names: &[&str],
    dtype: &str,
) -> (
    Vec<&'a Value>,
    tch_detloss::task_modules::GtBatch,
    impl Fn(&str) -> tch::Tensor + 'a,
) {
    let batch: Vec<&'a Value> = names
        .iter()
        .map(|n| {
            *cases
                .iter()
                .find(|c| c["name"] == format!("{n}_{dtype}"))
                .unwrap()
        })
        .collect();
    let boxes: Vec<tch::Tensor> = batch.iter().map(|c| input(c, "gt_bboxes")).collect();
    let labels: Vec<tch::Tensor> = batch.iter().map(|c| input(c, "gt_labels")).collect();
    let gts = tch_detloss::task_modules::GtBatch::pad(&boxes, &labels).unwrap();
    let rows = batch.clone();
    let stack =
        move |k: &str| tch::Tensor::stack(&rows.iter().map(|c| input(c, k)).collect::<Vec<_>>(), 0);
    (batch, gts, stack)
}

fn tal_check(
    name: &str,
    case: &Value,
    r: &tch_detloss::task_modules::TaskAlignedAssignResult,
    i: i64,
) {
    let res = &r.result;
    assert_same(
        &format!("{name} gt_inds"),
        &res.gt_inds.get(i),
        &output(case, "gt_inds"),
        0.0,
    );
    assert_same(
        &format!("{name} labels"),
        &res.labels.get(i),
        &output(case, "labels"),
        0.0,
    );
    assert_same(
        &format!("{name} max_overlaps"),
        &res.max_overlaps.get(i),
        &output(case, "max_overlaps"),
        0.0,
    );
    assert_same(
        &format!("{name} assign_metrics"),
        &r.assign_metrics.get(i),
        &output(case, "assign_metrics"),
        0.0,
    );
}

#[test]
fn task_aligned_assigner() {
    use tch_detloss::task_modules::{GtBatch, TaskAlignedAssigner};
    let cases = family("TaskAlignedAssigner");
    assert_eq!(cases.len(), 12);
    let gts_of = |case: &Value| {
        GtBatch::pad(&[input(case, "gt_bboxes")], &[input(case, "gt_labels")]).unwrap()
    };
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let TaskModule::TaskAlignedAssigner(mut a) = build(&case["config"]).unwrap() else {
            panic!("{name}: not a TaskAlignedAssigner");
        };
        let (alpha, beta) = (
            case["args"]["alpha"].as_f64().unwrap(),
            case["args"]["beta"].as_f64().unwrap(),
        );
        for chunk in [a.chunk_elements, 1] {
            a.chunk_elements = chunk;
            let r = a
                .assign(
                    &input(case, "priors"),
                    &input(case, "decoded").unsqueeze(0),
                    &input(case, "scores").unsqueeze(0),
                    &gts_of(case),
                    alpha,
                    beta,
                    None,
                )
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            tal_check(&format!("{name} (chunk {chunk})"), case, &r, 0);
        }
    }
    // Three images with 4, 4 and no ground truths in one batch: each row as alone.
    for dtype in ["float32", "float64"] {
        let names = [
            "tal_topk13_a1_b6",
            "tal_duplicate_and_tiny_gts",
            "tal_no_gt",
        ];
        let (batch, gts, stack) = assigner_batch(&cases, &names, dtype);
        let a = TaskAlignedAssigner::from_config(&batch[0]["config"]).unwrap();
        let r = a
            .assign(
                &input(batch[0], "priors"),
                &stack("decoded"),
                &stack("scores"),
                &gts,
                1.0,
                6.0,
                None,
            )
            .unwrap();
        for (i, c) in batch.iter().enumerate() {
            tal_check(&format!("batched {}", c["name"]), c, &r, i as i64);
        }
    }
}

fn dsl_check(name: &str, case: &Value, r: &tch_detloss::task_modules::AssignResult, i: i64) {
    assert_same(
        &format!("{name} gt_inds"),
        &r.gt_inds.get(i),
        &output(case, "gt_inds"),
        0.0,
    );
    assert_same(
        &format!("{name} labels"),
        &r.labels.get(i),
        &output(case, "labels"),
        0.0,
    );
    let want = output(case, "max_overlaps");
    let got = r.max_overlaps.get(i);
    // MMDetection's per-image early return gives zeros of the predictions' dtype; in a batch
    // with ground truths they are float32 (README).
    let got =
        if got.kind() != want.kind() && case["name"].as_str().unwrap().contains("no_candidate") {
            assert_eq!(got.kind(), tch::Kind::Float, "{name}");
            got.to_kind(want.kind())
        } else {
            got
        };
    assert_same(&format!("{name} max_overlaps"), &got, &want, 0.0);
}

#[test]
fn dynamic_soft_label_assigner() {
    use tch_detloss::task_modules::{DynamicSoftLabelAssigner, GtBatch};
    let cases = family("DynamicSoftLabelAssigner");
    assert_eq!(cases.len(), 7);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let TaskModule::DynamicSoftLabelAssigner(mut a) = build(&case["config"]).unwrap() else {
            panic!("{name}: not a DynamicSoftLabelAssigner");
        };
        let gts = GtBatch::pad(&[input(case, "gt_bboxes")], &[input(case, "gt_labels")]).unwrap();
        for chunk in [a.chunk_elements, 1] {
            a.chunk_elements = chunk;
            let r = a
                .assign(
                    &input(case, "priors"),
                    &input(case, "decoded").unsqueeze(0),
                    &input(case, "scores").unsqueeze(0),
                    &gts,
                    None,
                )
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            dsl_check(&format!("{name} (chunk {chunk})"), case, &r, 0);
        }
    }
    // Four images of one batch (5, 3, 1 and no ground truths): each row as alone.
    let names = [
        "dsl_rtmdet",
        "dsl_duplicate_gts",
        "dsl_no_candidate",
        "dsl_no_gt",
    ];
    let (batch, gts, stack) = assigner_batch(&cases, &names, "float32");
    let a = DynamicSoftLabelAssigner::from_config(&batch[0]["config"]).unwrap();
    let r = a
        .assign(
            &input(batch[0], "priors"),
            &stack("decoded"),
            &stack("scores"),
            &gts,
            None,
        )
        .unwrap();
    for (i, c) in batch.iter().enumerate() {
        dsl_check(&format!("batched {}", c["name"]), c, &r, i as i64);
    }
}

#[test]
fn rtmdet_head_targets() {
    use tch::Kind;
    use tch_detloss::dense_heads::RTMDetHeadTargets;
    use tch_detloss::task_modules::GtBatch;
    let cases = family("RTMDetHead");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let head = RTMDetHeadTargets::from_config(&case["config"])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let a = &case["args"];
        let sizes = pairs(&a["featmap_sizes"]);
        let images = a["images"].as_i64().unwrap();
        let metas = case_metas(case);
        let (priors, valid, counts) = head.priors(&sizes, &metas, Device::Cpu).unwrap();
        // The head's outputs flattened as loss_by_feat does: (B, N, C) and (B, N, 4).
        let flat = |k: &str, c: i64| head_outputs(case, k, sizes.len(), images, c);
        let num_classes = head.num_classes;
        let cls = flat("cls_scores", num_classes);
        let decoded = head.decode(&priors, &flat("bbox_preds", 4)).unwrap();
        let (boxes, labels, gts) = head_case_gts(case, images);
        let t = head
            .targets(&priors, &counts, &valid, &metas, &decoded, &cls, &gts)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for (key, ours) in [
            ("labels", &t.labels),
            ("assign_metrics", &t.assign_metrics),
            ("label_weights", &t.label_weights),
        ] {
            for (l, lvl) in t.levels(ours).unwrap().iter().enumerate() {
                let k = format!("{key}.level{l}");
                assert_same(
                    &format!("{name} {k}"),
                    &lvl.flatten(0, 1),
                    &output(case, &k),
                    0.0,
                );
            }
        }
        let pos = mmdet_order(&t.pos_mask, &counts);
        let rows = pos.nonzero().squeeze_dim(1);
        let pos_targets = mmdet_order(&t.bbox_targets, &counts).index_select(0, &rows);
        assert_same(
            &format!("{name} pos_bbox_targets"),
            &pos_targets,
            &output(case, "pos_bbox_targets"),
            0.0,
        );
        let pos_w = mmdet_order(&t.assign_metrics, &counts).index_select(0, &rows);
        assert_same(
            &format!("{name} pos_bbox_weights"),
            &pos_w,
            &output(case, "pos_bbox_weights"),
            0.0,
        );
        // The divisors are sums over the positives in another order than MMDetection's
        // (per level, then over levels): within 2 P units in the last place (see FCOS).
        let (cls_avg, bbox_avg) = t.avg_factors().unwrap();
        let p = 2.0 * rows.size()[0] as f64;
        assert_same(
            &format!("{name} cls_avg_factor"),
            &cls_avg,
            &output(case, "cls_avg_factor"),
            p,
        );
        assert_same(
            &format!("{name} bbox_avg_factor"),
            &bbox_avg,
            &output(case, "bbox_avg_factor"),
            p,
        );
        assert_eq!(cls_avg.kind(), Kind::Float);
        // Batched against image by image.
        for j in 0..images {
            let one = GtBatch::pad(
                &boxes[j as usize..=j as usize],
                &labels[j as usize..=j as usize],
            )
            .unwrap();
            let alone = head
                .targets(
                    &priors,
                    &counts,
                    &valid.narrow(0, j, 1),
                    &metas[j as usize..=j as usize],
                    &decoded.narrow(0, j, 1),
                    &cls.narrow(0, j, 1),
                    &one,
                )
                .unwrap();
            assert!(
                alone.labels.get(0).equal(&t.labels.get(j))
                    && alone.assign_metrics.get(0).equal(&t.assign_metrics.get(j))
                    && alone.bbox_targets.get(0).equal(&t.bbox_targets.get(j)),
                "{name}: image {j} alone differs from its row of the batch"
            );
        }
    }
}

#[test]
fn heads_and_assigners_reject_bad_inputs() {
    use serde_json::json;
    use tch::{Kind, Tensor};
    use tch_detloss::dense_heads::{FCOSHeadTargets, ImageMeta, RTMDetHeadTargets};
    use tch_detloss::task_modules::{DynamicSoftLabelAssigner, GtBatch, TaskAlignedAssigner};
    let cpu = (Kind::Float, Device::Cpu);
    let gts = GtBatch::pad(
        &[Tensor::from_slice(&[1.0f32, 1.0, 9.0, 9.0]).view([1, 4])],
        &[Tensor::from_slice(&[0i64])],
    )
    .unwrap();
    let msg = |e: anyhow::Error| format!("{e:#}");
    let fcos = FCOSHeadTargets::from_config(&json!({"type": "FCOSHead", "num_classes": 2,
        "strides": [8], "regress_ranges": [[-1, 64]]}))
    .unwrap();
    let e = msg(fcos
        .targets(&Tensor::zeros([4, 3], cpu), &[4], &gts)
        .unwrap_err());
    assert!(e.contains("points must be (N, 2)"), "{e}");
    let e = msg(fcos
        .targets(&Tensor::zeros([4, 2], cpu), &[3], &gts)
        .unwrap_err());
    assert!(e.contains("level counts"), "{e}");
    let e = msg(
        FCOSHeadTargets::from_config(&json!({"type": "FCOSHead", "num_classes": 2,
        "strides": [8, 16], "regress_ranges": [[-1, 64]]}))
        .unwrap_err(),
    );
    assert!(e.contains("1 regress_ranges for 2 strides"), "{e}");
    assert!(FCOSHeadTargets::from_config(&json!({"type": "ATSSHead", "num_classes": 2})).is_err());
    let priors = Tensor::zeros([5, 4], cpu);
    let tal = TaskAlignedAssigner::from_config(&json!({"type": "TaskAlignedAssigner", "topk": 3}))
        .unwrap();
    let e = msg(tal
        .assign(
            &priors,
            &Tensor::zeros([1, 4, 4], cpu),
            &Tensor::zeros([1, 5, 2], cpu),
            &gts,
            1.0,
            6.0,
            None,
        )
        .unwrap_err());
    assert!(e.contains("decoded boxes [1, 4, 4], need [1, 5, 4]"), "{e}");
    let dsl = DynamicSoftLabelAssigner::from_config(&json!({"type": "DynamicSoftLabelAssigner"}))
        .unwrap();
    let e = msg(dsl
        .assign(
            &priors,
            &Tensor::zeros([1, 5, 4], cpu),
            &Tensor::zeros([1, 5, 2], (Kind::Int64, Device::Cpu)),
            &gts,
            None,
        )
        .unwrap_err());
    assert!(e.contains("need floating [1, 5, C]"), "{e}");
    for bad in [
        json!({"type": "TaskAlignedAssigner", "topk": 0}),
        json!({"type": "DynamicSoftLabelAssigner", "iou_calculator": {"type": "BboxOverlaps2D", "scale": 8.0}}),
    ] {
        assert!(build(&bad).is_err(), "{bad} was accepted");
    }
    let rtm = RTMDetHeadTargets::from_config(&json!({"type": "RTMDetHead", "num_classes": 2,
        "anchor_generator": {"type": "MlvlPointGenerator", "offset": 0, "strides": [8]},
        "train_cfg": {"assigner": {"type": "DynamicSoftLabelAssigner"}}}))
    .unwrap();
    let metas = [ImageMeta {
        img_shape: (16, 16),
        pad_shape: (16, 16),
    }];
    let (p, valid, counts) = rtm.priors(&[(2, 2)], &metas, Device::Cpu).unwrap();
    let e = msg(rtm
        .targets(
            &p,
            &counts,
            &valid,
            &[metas[0], metas[0]],
            &Tensor::zeros([1, 4, 4], cpu),
            &Tensor::zeros([1, 4, 2], cpu),
            &gts,
        )
        .unwrap_err());
    assert!(e.contains("2 image metas"), "{e}");
    let e = msg(
        RTMDetHeadTargets::from_config(&json!({"type": "RTMDetHead", "num_classes": 2}))
            .unwrap_err(),
    );
    assert!(e.contains("train_cfg"), "{e}");
}

#[test]
fn gfl_head_loss_inputs() {
    use tch::Tensor;
    use tch_detloss::dense_heads::GFLHeadTargets;
    let cases = family("GFLHead");
    assert_eq!(cases.len(), 1);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let head = GFLHeadTargets::from_config(&case["config"])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let a = &case["args"];
        let sizes = pairs(&a["featmap_sizes"]);
        let images = a["images"].as_i64().unwrap();
        let metas = case_metas(case);
        let (_, _, gts) = head_case_gts(case, images);
        let t = head
            .targets
            .get_targets(&sizes, &metas, &gts, None, Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let flat = |k: &str, c: i64| head_outputs(case, k, sizes.len(), images, c);
        let cls = flat("cls_scores", head.targets.num_classes);
        let reg = flat("bbox_preds", 4 * (head.reg_max + 1));
        let l = head.loss_inputs(&t, &cls, &reg).unwrap();
        let counts = &t.num_level_anchors;
        for (key, ours) in [
            ("labels", &t.labels),
            ("scores", &l.scores),
            ("label_weights", &t.label_weights),
        ] {
            for (lvl, x) in t.levels(ours).unwrap().iter().enumerate() {
                let k = format!("{key}.level{lvl}");
                assert_same(
                    &format!("{name} {k}"),
                    &x.flatten(0, 1),
                    &output(case, &k),
                    0.0,
                );
            }
        }
        let pos = mmdet_order(&t.sampling.pos_mask, counts);
        let rows = pos.nonzero().squeeze_dim(1);
        let at_pos = |x: &Tensor| mmdet_order(x, counts).index_select(0, &rows);
        assert_same(
            &format!("{name} pred"),
            &at_pos(&l.pred_boxes),
            &output(case, "pos_pred_boxes"),
            0.0,
        );
        assert_same(
            &format!("{name} target"),
            &at_pos(&l.target_boxes),
            &output(case, "pos_target_boxes"),
            0.0,
        );
        assert_same(
            &format!("{name} weights"),
            &at_pos(&l.weights),
            &output(case, "pos_weights"),
            0.0,
        );
        assert_same(
            &format!("{name} corners"),
            &at_pos(&l.corner_targets).reshape([-1]),
            &output(case, "pos_corner_targets"),
            0.0,
        );
        let cls_avg = tch_detloss::dist::reduce_mean(&t.avg_factor).unwrap();
        assert_same(
            &format!("{name} cls_avg_factor"),
            &cls_avg,
            &output(case, "cls_avg_factor"),
            0.0,
        );
        // A sum over the positives in another order (see FCOS).
        let p = 2.0 * rows.size()[0] as f64;
        assert_same(
            &format!("{name} bbox_avg_factor"),
            &l.bbox_avg_factor().unwrap(),
            &output(case, "bbox_avg_factor"),
            p,
        );
    }
}

#[test]
fn tood_head_targets() {
    use tch_detloss::dense_heads::TOODHeadTargets;
    let cases = family("TOODHead");
    assert_eq!(cases.len(), 1);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let head = TOODHeadTargets::from_config(&case["config"])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let a = &case["args"];
        let sizes = pairs(&a["featmap_sizes"]);
        let images = a["images"].as_i64().unwrap();
        let metas = case_metas(case);
        let (anchors, valid, counts) = head.anchors(&sizes, &metas, Device::Cpu).unwrap();
        let (boxes, labels, gts) = head_case_gts(case, images);
        let (decoded, scores) = (input(case, "decoded"), input(case, "scores"));
        let t = head
            .targets(&anchors, &counts, &valid, &metas, &decoded, &scores, &gts)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for (key, ours) in [
            ("labels", &t.labels),
            ("label_weights", &t.label_weights),
            ("bbox_targets", &t.bbox_targets),
            ("alignment_metrics", &t.alignment_metrics),
        ] {
            for (l, lvl) in t.levels(ours).unwrap().iter().enumerate() {
                let k = format!("{key}.level{l}");
                assert_same(&format!("{name} {k}"), lvl, &output(case, &k), 0.0);
            }
        }
        // Batched against image by image.
        for j in 0..images {
            let ju = j as usize;
            let one =
                tch_detloss::task_modules::GtBatch::pad(&boxes[ju..=ju], &labels[ju..=ju]).unwrap();
            let alone = head
                .targets(
                    &anchors,
                    &counts,
                    &valid.narrow(0, j, 1),
                    &metas[ju..=ju],
                    &decoded.narrow(0, j, 1),
                    &scores.narrow(0, j, 1),
                    &one,
                )
                .unwrap();
            assert!(
                alone.labels.get(0).equal(&t.labels.get(j))
                    && alone
                        .alignment_metrics
                        .get(0)
                        .equal(&t.alignment_metrics.get(j)),
                "{name}: image {j} alone differs from its row of the batch"
            );
        }
    }
}
