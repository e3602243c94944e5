//! Every pipeline reference case computed by MMDetection 3.3 (tests/data/pipeline_cases.json:
//! anchors, inside flags, the coder, the ATSS and MaxIoU assigners, the samplers with
//! MMDetection's own `randperm` draws, and the ATSS and anchor-head targets) passes through the
//! public API. Integer and boolean outputs must be equal; floating outputs agree to the last bits
//! of their dtype (the same operations in the same order, except where noted).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use rstest::rstest;
use serde_json::Value;
use tch::{Device, Kind, Tensor};
use tch_detloss::dense_heads::{centerness_target, DenseHeadTargets, ImageMeta};
use tch_detloss::task_modules::{
    anchor_inside_flags, build_sampler, ATSSAssigner, AnchorGenerator, AssignResult,
    DeltaXYWHBBoxCoder, GtBatch, MaxIoUAssigner, MaxShape, RandomSampler, SampleMode, Sampler,
};

use super::data_dir;

static CASES: LazyLock<Vec<Value>> = LazyLock::new(|| {
    let text = std::fs::read_to_string(data_dir().join("pipeline_cases.json"))
        .expect("pipeline_cases.json");
    let v: Value = serde_json::from_str(&text).expect("valid JSON");
    v["cases"].as_array().expect("cases").clone()
});

fn family(name: &str) -> Vec<&'static Value> {
    CASES.iter().filter(|c| c["family"] == name).collect()
}

/// A case tensor (`{"shape", "dtype", "data"}`) on the CPU; non-finite floats are written as
/// the strings "nan", "inf" and "-inf".
pub(super) fn t(v: &Value) -> Tensor {
    let shape: Vec<i64> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_i64().unwrap())
        .collect();
    let data = v["data"].as_array().unwrap();
    let f: Vec<f64> = data
        .iter()
        .map(|x| match x {
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::String(s) => match s.as_str() {
                "nan" => f64::NAN,
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                s => panic!("case value {s:?}"),
            },
            x => x.as_f64().unwrap(),
        })
        .collect();
    let x = Tensor::from_slice(&f).reshape(shape.as_slice());
    match v["dtype"].as_str().unwrap() {
        "float64" => x,
        "float32" => x.to_kind(Kind::Float),
        "int64" => x.to_kind(Kind::Int64),
        "uint8" => x.to_kind(Kind::Uint8),
        "bool" => x.to_kind(Kind::Bool),
        d => panic!("dtype {d}"),
    }
}

pub(super) fn input(case: &Value, name: &str) -> Tensor {
    t(&case["inputs"][name])
}

pub(super) fn output(case: &Value, name: &str) -> Tensor {
    t(&case["outputs"][name])
}

/// Equal values (NaN equal to NaN) and equal dtypes; floats within `ulps` units in the last
/// place of their dtype.
pub(super) fn assert_same(what: &str, got: &Tensor, want: &Tensor, ulps: f64) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    assert_eq!(got.kind(), want.kind(), "{what}: dtype");
    if got.numel() == 0 {
        return;
    }
    if !want.is_floating_point() {
        assert!(
            got.equal(want),
            "{what}: got {got:?}\nwant {want:?}",
            got = Vec::<i64>::try_from(got.to_kind(Kind::Int64).flatten(0, -1)).unwrap(),
            want = Vec::<i64>::try_from(want.to_kind(Kind::Int64).flatten(0, -1)).unwrap()
        );
        return;
    }
    let eps = if want.kind() == Kind::Double {
        f64::EPSILON
    } else {
        f32::EPSILON as f64
    };
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let both_nan = g.isnan().logical_and(&w.isnan());
    let tol = w.abs().clamp_min(1.0) * (eps * ulps);
    let ok = (&g - &w)
        .abs()
        .le_tensor(&tol)
        .logical_or(&both_nan)
        .logical_or(&g.eq_tensor(&w));
    let bad = ok.logical_not().sum(Kind::Int64).int64_value(&[]);
    assert_eq!(
        bad,
        0,
        "{what}: {bad} values differ; max |diff| {}",
        (&g - &w)
            .abs()
            .nan_to_num(0.0, None, None)
            .max()
            .double_value(&[])
    );
}

pub(super) fn pairs(v: &Value) -> Vec<(i64, i64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_i64().unwrap()))
        .collect()
}

pub(super) fn kind_of(name: &str) -> Kind {
    match name {
        "float64" => Kind::Double,
        "float32" => Kind::Float,
        k => panic!("kind {k}"),
    }
}

#[test]
fn case_counts() {
    let mut counts = BTreeMap::new();
    for c in CASES.iter() {
        *counts
            .entry(c["family"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    let want = [
        ("ATSSAssigner", 22),
        ("ATSSHead", 7),
        ("ATSSHead.centerness_target", 12),
        ("AnchorGenerator", 10),
        ("AnchorHead", 6),
        ("DeltaXYWHBBoxCoder.decode", 18),
        ("DeltaXYWHBBoxCoder.encode", 6),
        ("DeltaXYWHBBoxCoder.roundtrip", 2),
        ("MaxIoUAssigner", 19),
        ("PseudoSampler", 5),
        ("RandomSampler", 15),
        ("anchor_inside_flags", 5),
    ];
    let want: BTreeMap<String, i32> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(counts, want);
}

#[test]
fn anchor_generator() {
    for case in family("AnchorGenerator") {
        let name = case["name"].as_str().unwrap();
        let gen = AnchorGenerator::from_config(&case["config"])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let sizes = pairs(&case["args"]["featmap_sizes"]);
        let kind = kind_of(case["args"]["dtype"].as_str().unwrap());
        let pad = pairs(&Value::Array(vec![case["args"]["pad_shape"].clone()]))[0];
        let priors = gen.grid_priors(&sizes, kind, Device::Cpu).unwrap();
        let flags = gen.valid_flags(&sizes, pad, Device::Cpu).unwrap();
        for l in 0..gen.num_levels() {
            assert_same(
                &format!("{name} base_anchors {l}"),
                &gen.base_anchors()[l],
                &output(case, &format!("base_anchors.level{l}")),
                0.0,
            );
            assert_same(
                &format!("{name} grid_priors {l}"),
                &priors[l],
                &output(case, &format!("grid_priors.level{l}")),
                0.0,
            );
            assert_same(
                &format!("{name} valid_flags {l}"),
                &flags[l],
                &output(case, &format!("valid_flags.level{l}")),
                0.0,
            );
        }
        assert_same(
            &format!("{name} num_base_priors"),
            &Tensor::from_slice(&gen.num_base_priors()),
            &output(case, "num_base_priors"),
            0.0,
        );
        assert_same(
            &format!("{name} scales"),
            &Tensor::from_slice(gen.scales()),
            &output(case, "scales"),
            0.0,
        );
        assert_same(
            &format!("{name} ratios"),
            &Tensor::from_slice(gen.ratios()),
            &output(case, "ratios"),
            0.0,
        );
    }
}

#[test]
fn inside_flags() {
    for case in family("anchor_inside_flags") {
        let name = case["name"].as_str().unwrap();
        let a = &case["args"];
        let shape = (
            a["img_shape"][0].as_i64().unwrap(),
            a["img_shape"][1].as_i64().unwrap(),
        );
        let got = anchor_inside_flags(
            &input(case, "flat_anchors"),
            &input(case, "valid_flags"),
            shape,
            a["allowed_border"].as_f64().unwrap(),
        )
        .unwrap();
        assert_same(name, &got, &output(case, "inside_flags"), 0.0);
    }
}

#[test]
fn coder() {
    for case in family("DeltaXYWHBBoxCoder.encode")
        .into_iter()
        .chain(family("DeltaXYWHBBoxCoder.roundtrip"))
    {
        let name = case["name"].as_str().unwrap();
        let coder = DeltaXYWHBBoxCoder::from_config(&case["config"]).unwrap();
        let deltas = coder
            .encode(&input(case, "bboxes"), &input(case, "gt_bboxes"))
            .unwrap();
        assert_same(
            &format!("{name} encode"),
            &deltas,
            &output(case, "deltas"),
            0.0,
        );
        if case["family"] == "DeltaXYWHBBoxCoder.roundtrip" {
            let back = coder.decode(&input(case, "bboxes"), &deltas, None).unwrap();
            assert_same(
                &format!("{name} decode"),
                &back,
                &output(case, "decoded_bboxes"),
                0.0,
            );
        }
    }
    for case in family("DeltaXYWHBBoxCoder.decode") {
        let name = case["name"].as_str().unwrap();
        let coder = DeltaXYWHBBoxCoder::from_config(&case["config"])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let a = &case["args"];
        let per_image: Vec<(i64, i64)>;
        let max_shape = match &a["max_shape"] {
            Value::Array(s) if s[0].is_array() => {
                per_image = s
                    .iter()
                    .map(|p| (p[0].as_i64().unwrap(), p[1].as_i64().unwrap()))
                    .collect();
                Some(MaxShape::PerImage(&per_image))
            }
            Value::Array(s) => Some(MaxShape::Image(
                s[0].as_i64().unwrap(),
                s[1].as_i64().unwrap(),
            )),
            _ => None,
        };
        let clip = a["wh_ratio_clip"].as_f64().unwrap_or(16.0 / 1000.0);
        let got = coder
            .decode_with(
                &input(case, "bboxes"),
                &input(case, "pred_bboxes"),
                max_shape,
                clip,
            )
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_same(name, &got, &output(case, "decoded_bboxes"), 0.0);
    }
}

/// One image's ground truths (and ignore boxes) of a case as a batch of one.
fn one_image(case: &Value, suffix: &str) -> (GtBatch, Option<GtBatch>) {
    let gts = GtBatch::pad(
        &[input(case, &format!("gt_bboxes{suffix}"))],
        &[input(case, &format!("gt_labels{suffix}"))],
    )
    .unwrap();
    let key = format!("gt_bboxes_ignore{suffix}");
    let ignore = case["inputs"].get(&key).map(|v| {
        let b = t(v);
        let n = b.size()[0];
        GtBatch::pad(&[b], &[Tensor::zeros([n], (Kind::Int64, Device::Cpu))]).unwrap()
    });
    (gts, ignore)
}

fn check_assign(name: &str, got: &AssignResult, case: &Value, prefix: &str) {
    let (inds, overlaps, labels) = got.image(0);
    assert_same(
        &format!("{name} gt_inds"),
        &inds,
        &output(case, &format!("{prefix}gt_inds")),
        0.0,
    );
    assert_same(
        &format!("{name} labels"),
        &labels,
        &output(case, &format!("{prefix}labels")),
        0.0,
    );
    assert_same(
        &format!("{name} max_overlaps"),
        &overlaps,
        &output(case, &format!("{prefix}max_overlaps")),
        0.0,
    );
}

#[test]
fn atss_assigner() {
    for case in family("ATSSAssigner") {
        let name = case["name"].as_str().unwrap();
        let assigner = ATSSAssigner::from_config(&case["config"]).unwrap();
        let levels: Vec<i64> = case["args"]["num_level_priors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let (gts, ignore) = one_image(case, "");
        let got = assigner
            .assign(&input(case, "priors"), &levels, &gts, ignore.as_ref(), None)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        check_assign(name, &got, case, "");
        assert_eq!(
            got.num_gts.int64_value(&[0]),
            output(case, "num_gts").int64_value(&[]),
            "{name} num_gts"
        );
    }
}

#[test]
fn max_iou_assigner() {
    for case in family("MaxIoUAssigner") {
        let name = case["name"].as_str().unwrap();
        let assigner = MaxIoUAssigner::from_config(&case["config"]).unwrap();
        let (gts, ignore) = one_image(case, "");
        let got = assigner
            .assign(&input(case, "priors"), &gts, ignore.as_ref(), None)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        check_assign(name, &got, case, "");
    }
}

/// The case's assignment (MMDetection's `AssignResult` given as inputs) as a batch of one.
fn given_assign(case: &Value) -> AssignResult {
    AssignResult {
        num_gts: input(case, "assign.num_gts").view([1]),
        gt_inds: input(case, "assign.gt_inds").unsqueeze(0),
        max_overlaps: input(case, "assign.max_overlaps").unsqueeze(0),
        labels: input(case, "assign.labels").unsqueeze(0),
    }
}

fn check_sampling(
    name: &str,
    s: &tch_detloss::task_modules::SamplingResult,
    case: &Value,
    priors: &Tensor,
    gt_boxes: &Tensor,
) {
    let pos = s.pos_inds(0).unwrap();
    assert_same(
        &format!("{name} pos_inds"),
        &pos,
        &output(case, "pos_inds"),
        0.0,
    );
    assert_same(
        &format!("{name} neg_inds"),
        &s.neg_inds(0).unwrap(),
        &output(case, "neg_inds"),
        0.0,
    );
    assert_same(
        &format!("{name} pos_is_gt"),
        &s.pos_is_gt(0).unwrap(),
        &output(case, "pos_is_gt"),
        0.0,
    );
    let assigned = s.pos_assigned_gt_inds(0).unwrap();
    assert_same(
        &format!("{name} pos_assigned_gt_inds"),
        &assigned,
        &output(case, "pos_assigned_gt_inds"),
        0.0,
    );
    assert_same(
        &format!("{name} pos_gt_labels"),
        &s.pos_gt_labels(0).unwrap(),
        &output(case, "pos_gt_labels"),
        0.0,
    );
    // With the ground truths added, indices refer to cat([gt boxes, priors]).
    let all = if s.gt_flags.size()[1] > priors.size()[0] {
        Tensor::cat(&[gt_boxes, priors], 0)
    } else {
        priors.shallow_clone()
    };
    assert_same(
        &format!("{name} pos_priors"),
        &all.index_select(0, &pos),
        &output(case, "pos_priors"),
        0.0,
    );
    let boxes = if assigned.numel() > 0 {
        gt_boxes.index_select(0, &assigned)
    } else {
        gt_boxes.narrow(0, 0, 0)
    };
    assert_same(
        &format!("{name} pos_gt_bboxes"),
        &boxes,
        &output(case, "pos_gt_bboxes"),
        0.0,
    );
    let counts = (
        s.pos_counts().clamp_min(1).int64_value(&[0]),
        s.neg_counts().clamp_min(1).int64_value(&[0]),
    );
    assert_eq!(
        counts.0,
        output(case, "num_pos").int64_value(&[]),
        "{name} num_pos"
    );
    assert_eq!(
        counts.1,
        output(case, "num_neg").int64_value(&[]),
        "{name} num_neg"
    );
    assert_eq!(
        s.avg_factor().int64_value(&[]),
        output(case, "avg_factor").int64_value(&[]),
        "{name} avg_factor"
    );
    let (inds, overlaps, labels) = s.assign.image(0);
    assert_same(
        &format!("{name} assign_after.gt_inds"),
        &inds,
        &output(case, "assign_after.gt_inds"),
        0.0,
    );
    assert_same(
        &format!("{name} assign_after.labels"),
        &labels,
        &output(case, "assign_after.labels"),
        0.0,
    );
    assert_same(
        &format!("{name} assign_after.max_overlaps"),
        &overlaps,
        &output(case, "assign_after.max_overlaps"),
        0.0,
    );
}

#[test]
fn samplers_draw_as_mmdetection() {
    let _guard = super::RNG.lock().unwrap_or_else(|e| e.into_inner());
    for case in family("RandomSampler")
        .into_iter()
        .chain(family("PseudoSampler"))
    {
        let name = case["name"].as_str().unwrap();
        let (gts, _) = one_image(case, "");
        let assign = given_assign(case);
        let sampler: Box<dyn Sampler> = if case["family"] == "RandomSampler" {
            Box::new(
                RandomSampler::from_config(&case["config"])
                    .unwrap()
                    .with_mode(SampleMode::Exact),
            )
        } else {
            build_sampler(&case["config"]).unwrap()
        };
        tch::manual_seed(case["args"]["seed"].as_i64().unwrap());
        let s = sampler
            .sample(&assign, Some(&gts))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        check_sampling(
            name,
            &s,
            case,
            &input(case, "priors"),
            &input(case, "gt_bboxes"),
        );
    }
}

#[test]
fn centerness() {
    for case in family("ATSSHead.centerness_target") {
        let name = case["name"].as_str().unwrap();
        let got = centerness_target(&input(case, "anchors"), &input(case, "gts")).unwrap();
        assert_same(name, &got, &output(case, "centerness"), 0.0);
    }
}

fn metas(case: &Value) -> Vec<ImageMeta> {
    case["args"]["batch_img_metas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ImageMeta {
            img_shape: (
                m["img_shape"][0].as_i64().unwrap(),
                m["img_shape"][1].as_i64().unwrap(),
            ),
            pad_shape: (
                m["pad_shape"][0].as_i64().unwrap(),
                m["pad_shape"][1].as_i64().unwrap(),
            ),
        })
        .collect()
}

/// `name.level{l}` outputs concatenated over levels along dim 1 (image-major, per level).
fn levels_cat(case: &Value, name: &str, n_levels: usize) -> Tensor {
    Tensor::cat(
        &(0..n_levels)
            .map(|l| output(case, &format!("{name}.level{l}")))
            .collect::<Vec<_>>(),
        1,
    )
}

#[rstest]
#[case("ATSSHead")]
#[case("AnchorHead")]
fn head_targets(#[case] fam: &str) {
    let _guard = super::RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut centerness_checked = 0;
    for case in family(fam) {
        let name = case["name"].as_str().unwrap();
        let head = DenseHeadTargets::from_config(&case["config"])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"))
            .with_sample_mode(SampleMode::Exact);
        let metas = metas(case);
        let sizes = pairs(&case["args"]["featmap_sizes"]);
        let nl = sizes.len();
        let (anchors, valid, counts) = head.anchors(&sizes, &metas, Device::Cpu).unwrap();
        let given: Vec<Tensor> = (0..nl)
            .map(|l| input(case, &format!("anchors.level{l}")))
            .collect();
        assert_same(
            &format!("{name} anchors"),
            &anchors,
            &Tensor::cat(&given, 0),
            0.0,
        );
        let b = metas.len();
        let given_valid: Vec<Tensor> = (0..b)
            .map(|i| {
                Tensor::cat(
                    &(0..nl)
                        .map(|l| input(case, &format!("valid_flags[{i}].level{l}")))
                        .collect::<Vec<_>>(),
                    0,
                )
            })
            .collect();
        assert_same(
            &format!("{name} valid flags"),
            &valid,
            &Tensor::stack(&given_valid, 0),
            0.0,
        );
        let boxes: Vec<Tensor> = (0..b)
            .map(|i| input(case, &format!("gt_bboxes[{i}]")))
            .collect();
        let labels: Vec<Tensor> = (0..b)
            .map(|i| input(case, &format!("gt_labels[{i}]")))
            .collect();
        let gts = GtBatch::pad(&boxes, &labels).unwrap();
        let ignore = case["inputs"].get("gt_bboxes_ignore[0]").map(|_| {
            let ib: Vec<Tensor> = (0..b)
                .map(|i| input(case, &format!("gt_bboxes_ignore[{i}]")))
                .collect();
            let il: Vec<Tensor> = ib
                .iter()
                .map(|x| Tensor::zeros([x.size()[0]], (Kind::Int64, Device::Cpu)))
                .collect();
            GtBatch::pad(&ib, &il).unwrap()
        });
        if let Some(seed) = case["args"]["seed"].as_i64() {
            tch::manual_seed(seed);
        }
        let got = head
            .targets_for(&anchors, &counts, &valid, &metas, &gts, ignore.as_ref())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_same(
            &format!("{name} labels"),
            &got.labels,
            &levels_cat(case, "labels", nl),
            0.0,
        );
        assert_same(
            &format!("{name} label_weights"),
            &got.label_weights,
            &levels_cat(case, "label_weights", nl),
            0.0,
        );
        assert_same(
            &format!("{name} bbox_targets"),
            &got.bbox_targets,
            &levels_cat(case, "bbox_targets", nl),
            0.0,
        );
        assert_same(
            &format!("{name} bbox_weights"),
            &got.bbox_weights,
            &levels_cat(case, "bbox_weights", nl),
            0.0,
        );
        if fam == "ATSSHead" {
            assert_same(
                &format!("{name} anchors out"),
                &got.anchors,
                &levels_cat(case, "anchors", nl),
                0.0,
            );
        }
        assert_eq!(
            got.avg_factor.double_value(&[]),
            output(case, "avg_factor").int64_value(&[]) as f64,
            "{name} avg_factor"
        );
        for i in 0..b as i64 {
            let inside = &got.inside.get(i);
            assert_same(
                &format!("{name} inside_flags[{i}]"),
                inside,
                &output(case, &format!("inside_flags[{i}]")),
                0.0,
            );
            // MMDetection's indices count the inside anchors only.
            let rank = inside.to_kind(Kind::Int64).cumsum(0, Kind::Int64) - 1;
            let pos = got.sampling.pos_inds(i).unwrap();
            assert_same(
                &format!("{name} pos_inds[{i}]"),
                &rank.index_select(0, &pos),
                &output(case, &format!("pos_inds[{i}]")),
                0.0,
            );
            let neg = got.sampling.neg_inds(i).unwrap();
            assert_same(
                &format!("{name} neg_inds[{i}]"),
                &rank.index_select(0, &neg),
                &output(case, &format!("neg_inds[{i}]")),
                0.0,
            );
            assert_same(
                &format!("{name} pos_assigned_gt_inds[{i}]"),
                &got.sampling.pos_assigned_gt_inds(i).unwrap(),
                &output(case, &format!("pos_assigned_gt_inds[{i}]")),
                0.0,
            );
            // The head's centerness targets at its positives, against MMDetection's
            // centerness_target of the same positives.
            let key = format!("{name}_centerness_img{i}");
            if let Some(c) = CASES.iter().find(|c| c["name"] == key.as_str()) {
                assert_same(
                    &format!("{name} centerness[{i}]"),
                    &got.centerness.get(i).index_select(0, &pos),
                    &output(c, "centerness"),
                    0.0,
                );
                centerness_checked += 1;
            }
        }
    }
    // Every ATSS head image with positives has such a case (11 of the 12; one is random pairs).
    assert_eq!(centerness_checked, if fam == "ATSSHead" { 11 } else { 0 });
}
