//! The fused kernels against the unfused stock-op compositions (evaluated in float64 on the same
//! inputs): every loss variant, every dtype, empty and single-class shapes, odd sizes that leave
//! vector tails, non-contiguous inputs, every weight shape and reduction; gradients of the fused
//! backward against autograd of the unfused path; and the documented handling of bad inputs.

use rstest::rstest;
use tch::{Device, Kind, Tensor};
use tch_detloss::golden::rel_err;
use tch_detloss::losses::{FocalLoss, QualityFocalLoss};
use tch_detloss::{registry, AvgFactor, Loss, LossArgs, Reduction, Target};

/// How a variant's target looks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tgt {
    Labels,
    Dense,
    LabelsScores,
}

/// The loss variants under test: a config dict and the target it takes.
const VARIANTS: &[(&str, Tgt, bool)] = &[
    (r#"{"type": "FocalLoss"}"#, Tgt::Labels, false),
    (
        r#"{"type": "FocalLoss", "gamma": 1.5, "alpha": 0.5}"#,
        Tgt::Labels,
        false,
    ),
    (r#"{"type": "FocalLoss", "gamma": 0.0}"#, Tgt::Labels, false),
    (
        r#"{"type": "FocalLoss", "gamma": 2.0, "loss_weight": 0.5}"#,
        Tgt::Dense,
        false,
    ),
    (
        r#"{"type": "FocalLoss", "activated": true}"#,
        Tgt::Labels,
        true,
    ),
    (
        r#"{"type": "FocalLoss", "activated": true, "gamma": 1.5}"#,
        Tgt::Dense,
        true,
    ),
    (r#"{"type": "QualityFocalLoss"}"#, Tgt::LabelsScores, false),
    (
        r#"{"type": "QualityFocalLoss", "beta": 1.0, "loss_weight": 2.0}"#,
        Tgt::Dense,
        false,
    ),
    (
        r#"{"type": "QualityFocalLoss", "activated": true}"#,
        Tgt::LabelsScores,
        true,
    ),
    (
        r#"{"type": "QualityFocalLoss", "activated": true, "beta": 1.5}"#,
        Tgt::Dense,
        true,
    ),
    (r#"{"type": "VarifocalLoss"}"#, Tgt::Dense, false),
    (
        r#"{"type": "VarifocalLoss", "iou_weighted": false, "gamma": 1.5, "alpha": 0.5}"#,
        Tgt::Dense,
        false,
    ),
];

struct Inputs {
    pred: Tensor,
    target: Tensor,
    scores: Option<Tensor>,
}

impl Inputs {
    fn target(&self) -> Target<'_> {
        match &self.scores {
            Some(s) => Target::LabelsScores {
                labels: &self.target,
                scores: s,
            },
            None => Target::Tensor(&self.target),
        }
    }
}

/// Random inputs of a variant. `pred` is built transposed (non-contiguous) when asked.
fn inputs(tgt: Tgt, prob: bool, n: i64, c: i64, kind: Kind, transposed: bool) -> Inputs {
    let opts = (Kind::Double, Device::Cpu);
    let mut logits = Tensor::randn([n, c], opts) * 2.5;
    if prob {
        logits = logits.sigmoid();
        if matches!(kind, Kind::Half | Kind::BFloat16) {
            // A half probability of exactly 0 or 1 has a BCE gradient of 1e12, beyond half's
            // range (as with stock torch); keep half inputs off the saturated ends.
            logits = logits.clamp(1e-3, 1.0 - 1e-3);
        }
    }
    let pred = if transposed {
        logits.t_copy().contiguous().t_()
    } else {
        logits
    };
    let pred = pred.to_kind(kind);
    let labels = Tensor::randint(c + 1, [n], (Kind::Int64, Device::Cpu)); // c = background
    let (target, scores) = match tgt {
        Tgt::Labels => (labels, None),
        Tgt::LabelsScores => (labels, Some(Tensor::rand([n], opts).to_kind(kind))),
        Tgt::Dense => {
            // Mostly zeros, some soft positives and some exact ones.
            let soft = Tensor::rand([n, c], opts);
            let keep = Tensor::rand([n, c], opts).gt(0.7).to_kind(Kind::Double);
            let ones = Tensor::rand([n, c], opts).gt(0.95).to_kind(Kind::Double);
            ((soft * keep).maximum(&ones).to_kind(kind), None)
        }
    };
    Inputs {
        pred,
        target,
        scores,
    }
}

/// Weight shapes each loss accepts, as MMDetection broadcasts them.
fn weights(ty: &str, n: i64, c: i64) -> Vec<(&'static str, Option<Tensor>)> {
    let w = |shape: &[i64]| Some(Tensor::rand(shape, (Kind::Double, Device::Cpu)) + 0.25);
    let mut v = vec![("none", None)];
    match ty {
        "FocalLoss" => {
            v.push(("(N,)", w(&[n])));
            v.push(("(N*C,)", w(&[n * c])));
            v.push(("(N,C)", w(&[n, c])));
            // A transposed (non-contiguous) (N, C) weight.
            v.push(("(N,C)^T", w(&[c, n]).map(|t| t.transpose(0, 1))));
        }
        "QualityFocalLoss" => {
            v.push(("(N,)", w(&[n])));
            v.push(("()", w(&[])));
        }
        _ => {
            v.push(("(N,C)", w(&[n, c])));
            v.push(("(C,)", w(&[c])));
            v.push(("(N,1)", w(&[n, 1])));
        }
    }
    v
}

/// Relative tolerance of a dtype's fused result against the float64 reference.
fn tolerance(kind: Kind) -> f64 {
    match kind {
        Kind::Double => 1e-10,
        Kind::Float => 2e-5,
        Kind::Half => 4e-3,
        _ => 3e-2, // bfloat16: 8 bits of mantissa
    }
}

/// Whether `got` matches the float64 `want` to the dtype's precision: its relative tolerance of
/// `want`'s largest magnitude, plus, for float16, the spacing of its subnormals (2^-24), which
/// is all a float16 gradient of a mean over many elements can resolve.
fn assert_close(got: &Tensor, want: &Tensor, kind: Kind, what: &str) {
    let got = got.to_device(Device::Cpu);
    let err = rel_err(&got, want).unwrap_or_else(|e| panic!("{what}: {e}"));
    let scale = if want.numel() == 0 {
        1.0
    } else {
        want.abs()
            .nan_to_num(0.0, None, None)
            .max()
            .double_value(&[])
    };
    let quantum = if kind == Kind::Half {
        2f64.powi(-24)
    } else {
        0.0
    };
    let allowed = tolerance(kind) + quantum / scale.max(f64::MIN_POSITIVE);
    assert!(
        err <= allowed,
        "{what}: error {err:e} of the largest magnitude {scale:e} > {allowed:e}"
    );
}

const SHAPES: &[(i64, i64)] = &[(0, 5), (7, 1), (37, 13), (3, 300), (257, 80)];
const REDUCTIONS: &[(&str, Option<Reduction>, Option<f64>, bool)] = &[
    ("none", Some(Reduction::None), None, false),
    ("mean", Some(Reduction::Mean), None, false),
    ("sum", Some(Reduction::Sum), None, false),
    ("mean/avg", Some(Reduction::Mean), Some(13.5), false),
    ("mean/avg-tensor", Some(Reduction::Mean), Some(7.25), true),
    ("none/avg", Some(Reduction::None), Some(3.0), false),
    ("config", None, None, false),
];

fn call_args(
    w: Option<&Tensor>,
    red: Option<Reduction>,
    avg: Option<f64>,
    avg_tensor: bool,
    k: Kind,
) -> LossArgs<'_> {
    let mut a = LossArgs::new();
    if let Some(w) = w {
        a = a.weight(w);
    }
    if let Some(r) = red {
        a = a.reduction(r);
    }
    match (avg, avg_tensor) {
        (Some(v), false) => a.avg_factor(v),
        (Some(v), true) => a.avg_factor(AvgFactor::Tensor(Tensor::from(v).to_kind(k))),
        _ => a,
    }
}

static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs every shape, layout, weight and reduction of one variant on `device` and compares the
/// fused loss and both gradient paths with the unfused composition in float64 on the CPU.
fn check_variant(variant: usize, kind: Kind, device: Device) {
    // The global RNG is shared by the parallel tests: hold it so that each variant sees the
    // same inputs on every run.
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(variant as i64 * 31 + kind as i64);
    let (config, tgt, prob) = VARIANTS[variant];
    let loss = registry::build_str(config).unwrap();
    let ty = loss.type_name().to_string();
    let mut checked = 0;
    for &(n, c) in SHAPES {
        for transposed in [false, true] {
            let inp = inputs(tgt, prob, n, c, kind, transposed);
            let on_device = Inputs {
                pred: inp.pred.to_device(device),
                target: inp.target.to_device(device),
                scores: inp.scores.as_ref().map(|s| s.to_device(device)),
            };
            for (wname, weight) in weights(&ty, n, c) {
                for &(rname, red, avg, avg_tensor) in REDUCTIONS {
                    let ctx = format!("{config} {kind:?} {device:?} [{n}, {c}] transposed={transposed} weight={wname} {rname}");
                    let weight_k = weight.as_ref().map(|w| w.to_kind(kind));
                    let weight_d = weight_k.as_ref().map(|w| w.to_device(device));

                    // Fused, in the input dtype, on the device.
                    let pred = on_device.pred.detach().set_requires_grad(true);
                    let mut args = call_args(weight_d.as_ref(), red, avg, avg_tensor, kind);
                    if let Some(AvgFactor::Tensor(t)) = &args.avg_factor {
                        args.avg_factor = Some(AvgFactor::Tensor(t.to_device(device)));
                    }
                    let out = loss.forward(&pred, on_device.target(), &args).expect(&ctx);
                    let upstream =
                        Tensor::rand(out.size().as_slice(), (Kind::Double, Device::Cpu)) + 0.5;
                    let objective =
                        (&out * upstream.to_kind(out.kind()).to_device(device)).sum(Kind::Double);
                    // On the CPU the first backward uses the gradient the forward pass wrote and the
                    // second (graph retained) recomputes it in the backward kernel; on CUDA both
                    // recompute. All must be right.
                    let first =
                        Tensor::run_backward(&[&objective], &[&pred], true, false).remove(0);
                    let second =
                        Tensor::run_backward(&[&objective], &[&pred], false, false).remove(0);

                    // Unfused, in float64 on the same values, on the CPU.
                    let pred64 = inp
                        .pred
                        .to_kind(Kind::Double)
                        .detach()
                        .set_requires_grad(true);
                    let scores64 = inp.scores.as_ref().map(|s| s.to_kind(Kind::Double));
                    let target64 = if tgt == Tgt::Dense {
                        inp.target.to_kind(Kind::Double)
                    } else {
                        inp.target.shallow_clone()
                    };
                    let t64 = match &scores64 {
                        Some(s) => Target::LabelsScores {
                            labels: &target64,
                            scores: s,
                        },
                        None => Target::Tensor(&target64),
                    };
                    let w64 = weight_k.as_ref().map(|w| w.to_kind(Kind::Double));
                    let want = loss
                        .forward_unfused(
                            &pred64,
                            t64,
                            &call_args(w64.as_ref(), red, avg, avg_tensor, Kind::Double),
                        )
                        .expect(&ctx);
                    (&want * &upstream).sum(Kind::Double).backward();

                    assert_eq!(out.kind(), kind, "{ctx}: output dtype");
                    assert_eq!(out.device(), device, "{ctx}: output device");
                    assert_close(&out, &want, kind, &format!("{ctx}: loss"));
                    for (which, g) in [("first", first), ("second", second)] {
                        assert_close(&g, &pred64.grad(), kind, &format!("{ctx}: {which} grad"));
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(
        checked >= SHAPES.len() * 2 * REDUCTIONS.len() * 2,
        "only {checked} combinations ran"
    );
}

#[rstest]
fn fused_matches_unfused(
    #[values(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)] variant: usize,
    #[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind,
) {
    check_variant(variant, kind, Device::Cpu);
}

/// The CPU result does not depend on the thread count: the chunking is fixed by the shape and
/// the partials are added in order.
#[test]
fn cpu_result_is_bitwise_independent_of_threads() {
    let inp = inputs(Tgt::Labels, false, 5000, 80, Kind::Float, false);
    let loss = FocalLoss::default();
    let run = |threads: i32| {
        tch::set_num_threads(threads);
        let pred = inp.pred.detach().set_requires_grad(true);
        let l = loss
            .forward(&pred, inp.target(), &LossArgs::new().avg_factor(100.0))
            .unwrap();
        l.backward();
        (l.double_value(&[]), pred.grad())
    };
    let (l1, g1) = run(1);
    let (l2, g2) = run(2);
    tch::set_num_threads(2);
    assert_eq!(l1.to_bits(), l2.to_bits());
    assert!(g1.equal(&g2));
}

fn focal_err(pred: &Tensor, target: &Tensor, args: &LossArgs) -> String {
    let e = FocalLoss::default()
        .forward(pred, target.into(), args)
        .expect_err("must be rejected");
    format!("{e:#}")
}

#[test]
fn bad_inputs_are_errors() {
    let pred = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
    let none = LossArgs::new();
    // Wrong dims and shapes.
    assert!(focal_err(&pred.reshape([24]), &labels, &none).contains("(N, C)"));
    assert!(focal_err(&pred.reshape([2, 3, 4]), &labels, &none).contains("(N, C)"));
    assert!(focal_err(&pred, &labels.narrow(0, 0, 5), &none).contains("(6,)"));
    assert!(focal_err(
        &pred,
        &Tensor::zeros([6, 5], (Kind::Float, Device::Cpu)),
        &none
    )
    .contains("shape"));
    // Wrong dtypes.
    assert!(focal_err(&pred.to_kind(Kind::Int64), &labels, &none).contains("float32"));
    assert!(focal_err(&pred, &labels.to_kind(Kind::Float), &none).contains("integer"));
    // Labels below 0 and above C (C = 4 is background and valid).
    let e = focal_err(&pred, &Tensor::from_slice(&[0i64, 1, 2, 3, -1, 0]), &none);
    assert!(e.contains("outside [0, 4]"), "{e}");
    let e = focal_err(&pred, &Tensor::from_slice(&[0i64, 5, 2, 3, 4, 0]), &none);
    assert!(e.contains("outside [0, 4]"), "{e}");
    // avg_factor with sum, as MMDetection.
    let e = focal_err(
        &pred,
        &labels,
        &LossArgs::new().reduction(Reduction::Sum).avg_factor(2.0),
    );
    assert!(
        e.contains("avg_factor can not be used with reduction=\"sum\""),
        "{e}"
    );
    // avg_factor tensor of more than one element.
    let two = Tensor::from_slice(&[1.0f32, 2.0]);
    assert!(focal_err(&pred, &labels, &LossArgs::new().avg_factor(&two)).contains("one-element"));
    // Weights that do not broadcast.
    let w = Tensor::ones([5], (Kind::Float, Device::Cpu));
    assert!(focal_err(&pred, &labels, &LossArgs::new().weight(&w)).contains("weight"));
    // The unfused compositions reject the same inputs instead of panicking in a stock op.
    let unfused_err = |t: &Tensor, a: &LossArgs| {
        let e = FocalLoss::default()
            .forward_unfused(&pred, t.into(), a)
            .expect_err("must be rejected");
        format!("{e:#}")
    };
    assert!(
        unfused_err(&Tensor::zeros([6, 5], (Kind::Float, Device::Cpu)), &none).contains("shape")
    );
    assert!(unfused_err(&labels, &LossArgs::new().avg_factor(&two)).contains("one-element"));
    let e = unfused_err(
        &labels,
        &LossArgs::new().reduction(Reduction::Sum).avg_factor(2.0),
    );
    assert!(e.contains("avg_factor can not be used"), "{e}");
    // QFL takes (labels, scores) or a dense target; labels alone are not (N, C).
    let e = QualityFocalLoss::default()
        .forward(&pred, (&labels).into(), &none)
        .unwrap_err();
    assert!(format!("{e:#}").contains("shape"), "{e:#}");
    // Invalid configs name what is valid.
    let e = registry::build_str(r#"{"type": "FocalLoss", "gama": 2.0}"#).unwrap_err();
    assert!(format!("{e:#}").contains("gamma"), "{e:#}");
    let e = registry::build_str(r#"{"type": "FocalLoss", "use_sigmoid": false}"#).unwrap_err();
    assert!(format!("{e:#}").contains("use_sigmoid"), "{e:#}");
    let e = registry::build_str(r#"{"type": "NoSuchLoss"}"#).unwrap_err();
    assert!(format!("{e:#}").contains("FocalLoss"), "{e:#}");
    let e = registry::build_str(r#"{"type": "VarifocalLoss", "alpha": -1.0}"#).unwrap_err();
    assert!(format!("{e:#}").contains("alpha"), "{e:#}");
}

/// QFL follows MMDetection: any label outside [0, C) is background, not an error.
#[test]
fn qfl_labels_out_of_range_are_background() {
    let pred = Tensor::randn([5, 3], (Kind::Double, Device::Cpu));
    let scores = Tensor::rand([5], (Kind::Double, Device::Cpu));
    let odd = Tensor::from_slice(&[-1i64, 3, 7, 0, 2]);
    let bg = Tensor::from_slice(&[3i64, 3, 3, 0, 2]);
    let l = QualityFocalLoss::default();
    let a = l
        .forward(&pred, (&odd, &scores).into(), &LossArgs::new())
        .unwrap();
    let b = l
        .forward(&pred, (&bg, &scores).into(), &LossArgs::new())
        .unwrap();
    assert!(a.allclose(&b, 0.0, 0.0, false));
}

/// Non-finite logits give what the stock-op composition gives (NaN propagates), never a crash.
#[test]
fn non_finite_logits_match_unfused() {
    for config in [
        r#"{"type": "FocalLoss"}"#,
        r#"{"type": "VarifocalLoss"}"#,
        r#"{"type": "QualityFocalLoss"}"#,
    ] {
        let loss = registry::build_str(config).unwrap();
        let pred =
            Tensor::from_slice(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.5, -40.0, 40.0])
                .reshape([3, 2]);
        let target = Tensor::from_slice(&[1.0f64, 0.0, 1.0, 0.0, 0.5, 1.0]).reshape([3, 2]);
        let args = LossArgs::new().reduction(Reduction::None);
        let got = loss.forward(&pred, (&target).into(), &args).unwrap();
        let want = loss
            .forward_unfused(&pred, (&target).into(), &args)
            .unwrap();
        assert!(
            got.isnan().equal(&want.isnan()),
            "{config}: NaN pattern {got} vs {want}"
        );
        let finite = want.isfinite();
        assert!(
            got.masked_select(&finite)
                .allclose(&want.masked_select(&finite), 1e-12, 1e-12, false),
            "{config}"
        );
        let mean = loss
            .forward(&pred, (&target).into(), &LossArgs::new())
            .unwrap();
        assert!(
            mean.double_value(&[]).is_nan(),
            "{config}: a NaN logit makes the mean NaN"
        );
    }
}

/// An empty batch: 'none' is empty, 'sum' is 0, 'mean' is NaN (0/0, as torch) unless an
/// avg_factor is given; backward gives an empty gradient.
#[test]
fn empty_batch() {
    let pred = Tensor::zeros([0, 80], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let labels = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    let l = FocalLoss::default();
    let none = l
        .forward(
            &pred,
            (&labels).into(),
            &LossArgs::new().reduction(Reduction::None),
        )
        .unwrap();
    assert_eq!(none.size(), [0, 80]);
    let sum = l
        .forward(
            &pred,
            (&labels).into(),
            &LossArgs::new().reduction(Reduction::Sum),
        )
        .unwrap();
    assert_eq!(sum.double_value(&[]), 0.0);
    let mean = l
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap();
    assert!(mean.double_value(&[]).is_nan());
    let avg = l
        .forward(&pred, (&labels).into(), &LossArgs::new().avg_factor(1.0))
        .unwrap();
    assert_eq!(avg.double_value(&[]), 0.0);
    avg.backward();
    assert_eq!(pred.grad().size(), [0, 80]);
}

/// With no input requiring grad the fused path records nothing.
#[test]
fn no_graph_without_requires_grad() {
    let pred = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
    let out = FocalLoss::default()
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap();
    assert!(!out.requires_grad());
    let out = tch::no_grad(|| {
        let p = pred.set_requires_grad(true);
        FocalLoss::default()
            .forward(&p, (&labels).into(), &LossArgs::new())
            .unwrap()
    });
    assert!(!out.requires_grad());
}

/// The kernels were compiled by nvcc into the embedded fatbin (the set-up installs nvcc), with
/// every entry point present for sm_80 and sm_90 and no register spills.
#[test]
fn cuda_kernels_compiled_without_spills() {
    if std::env::var_os("TCH_DETLOSS_NO_CUDA").is_some() {
        assert!(!tch_detloss::cuda::kernels_built());
        return;
    }
    assert!(
        tch_detloss::cuda::kernels_built(),
        "nvcc was not found at build time: run scripts/setup.sh"
    );
    let report = tch_detloss::cuda::ptxas_report();
    let planned = tch_detloss::testing::planned_kernel_names();
    assert!(
        planned.len() >= 3 * 2 * 4 * 2 + 4,
        "only {} planned",
        planned.len()
    );
    for arch in ["sm_80", "sm_90"] {
        for name in &planned {
            assert!(
                report.iter().any(|e| &e.name == name && e.arch == arch),
                "{name}, which the launch plan can form, is missing from the fatbin for {arch}"
            );
        }
    }
    let spilling: Vec<_> = report.iter().filter(|e| e.spill_bytes > 0).collect();
    assert!(spilling.is_empty(), "spills: {spilling:?}");
}

/// The device executor (kernels/kernels.cu) and the launch plan of the CUDA path, run on the
/// emulated device over CPU tensors: every test run executes what a GPU runs.
mod emulated {
    use super::*;
    use tch_detloss::testing::{with_emulated_device, EmulatedDevice};

    fn on<R>(d: EmulatedDevice, f: impl FnOnce() -> R) -> R {
        assert!(
            tch_detloss::testing::emulated_device_built(),
            "this build has no emulated device: the CUDA headers were not found (run scripts/setup.sh)"
        );
        with_emulated_device(d, f)
    }

    #[rstest]
    fn emulated_device_matches_unfused(
        #[values(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)] variant: usize,
        #[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind,
    ) {
        on(EmulatedDevice::default(), || {
            check_variant(variant, kind, Device::Cpu)
        });
    }

    /// Every entry point the launch plan can name exists on the emulated device, which compiles
    /// the same kernels.cu as the fatbin.
    #[test]
    fn every_planned_kernel_is_emulated() {
        let have = tch_detloss::testing::emulated_kernel_names();
        for name in tch_detloss::testing::planned_kernel_names() {
            assert!(have.contains(&name), "{name} is not on the emulated device");
        }
    }

    struct Pass1 {
        loss: Tensor,
        grad: Tensor,
    }

    /// One forward and backward of `config` on the emulated device `d`.
    fn pass(
        d: EmulatedDevice,
        config: &str,
        inp: &Inputs,
        red: Reduction,
        weight: Option<&Tensor>,
    ) -> Pass1 {
        let loss = registry::build_str(config).unwrap();
        on(d, || {
            let pred = inp.pred.detach().set_requires_grad(true);
            let mut args = LossArgs::new().reduction(red);
            if let Some(w) = weight {
                args = args.weight(w);
            }
            if red == Reduction::Mean {
                args = args.avg_factor(AvgFactor::Tensor(
                    Tensor::from(37.5f64).to_kind(inp.pred.kind()),
                ));
            }
            let out = loss.forward(&pred, inp.target(), &args).unwrap();
            let up = Tensor::ones_like(&out);
            let grad =
                Tensor::run_backward(&[&(&out * &up).sum(out.kind())], &[&pred], false, false)
                    .remove(0);
            Pass1 { loss: out, grad }
        })
    }

    /// 32-bit and 64-bit entry points, forward and reversed thread order, and a grid capped at
    /// 3 blocks (every thread strides many times) against the full grid: element outputs and
    /// gradients bitwise equal; reduced losses bitwise equal where only the index width or the
    /// thread order changes, and equal to float rounding where the grid (so the order of the
    /// partial sums) changes.
    #[rstest]
    fn entry_points_orders_and_grids_agree(
        #[values(0, 6, 7, 10)] variant: usize,
        #[values(Kind::Float, Kind::Double, Kind::BFloat16)] kind: Kind,
    ) {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(7 + variant as i64);
        let (config, tgt, prob) = VARIANTS[variant];
        let (n, c) = (401, 80); // 126 blocks of 256 threads, the last one partly idle
        let inp = inputs(tgt, prob, n, c, kind, false);
        // A weight per anchor, in the shape each loss broadcasts.
        let w_shape: &[i64] = if config.contains("Varifocal") {
            &[n, 1]
        } else {
            &[n]
        };
        let w = Tensor::rand(w_shape, (Kind::Double, Device::Cpu)).to_kind(kind);
        for red in [Reduction::None, Reduction::Mean, Reduction::Sum] {
            let base = pass(EmulatedDevice::default(), config, &inp, red, Some(&w));
            let same = [
                EmulatedDevice {
                    wide: true,
                    ..Default::default()
                },
                EmulatedDevice {
                    reverse: true,
                    ..Default::default()
                },
            ];
            for d in same {
                let o = pass(d, config, &inp, red, Some(&w));
                assert!(
                    o.loss.equal(&base.loss),
                    "{config} {kind:?} {red:?} {d:?}: loss"
                );
                assert!(
                    o.grad.equal(&base.grad),
                    "{config} {kind:?} {red:?} {d:?}: grad"
                );
            }
            let capped = EmulatedDevice {
                max_blocks: Some(3),
                reverse: true,
                wide: true,
            };
            let o = pass(capped, config, &inp, red, Some(&w));
            assert!(
                o.grad.equal(&base.grad),
                "{config} {kind:?} {red:?} capped: grad"
            );
            if red == Reduction::None {
                assert!(o.loss.equal(&base.loss), "{config} {kind:?} capped: loss");
            } else {
                assert_close(
                    &o.loss.to_kind(Kind::Double),
                    &base.loss.to_kind(Kind::Double),
                    kind,
                    &format!("{config} {kind:?} {red:?} capped: loss"),
                );
            }
        }
    }

    /// float16 and bfloat16 element outputs are the float32 results on the same values,
    /// rounded to nearest-even (by the `half` crate).
    #[rstest]
    fn half_outputs_are_rounded_float32_outputs(
        #[values(0, 4, 6, 10)] variant: usize,
        #[values(Kind::Half, Kind::BFloat16)] kind: Kind,
    ) {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(11 + variant as i64);
        let (config, tgt, prob) = VARIANTS[variant];
        let half = inputs(tgt, prob, 300, 7, kind, false);
        let single = Inputs {
            pred: half.pred.to_kind(Kind::Float),
            target: if tgt == Tgt::Dense {
                half.target.to_kind(Kind::Float)
            } else {
                half.target.shallow_clone()
            },
            scores: half.scores.as_ref().map(|s| s.to_kind(Kind::Float)),
        };
        let d = EmulatedDevice::default();
        let h = pass(d, config, &half, Reduction::None, None);
        let f = pass(d, config, &single, Reduction::None, None);
        for (what, got, want) in [("loss", &h.loss, &f.loss), ("grad", &h.grad, &f.grad)] {
            let want: Vec<f32> = Vec::try_from(want.flatten(0, -1)).unwrap();
            let got: Vec<f32> = Vec::try_from(got.to_kind(Kind::Float).flatten(0, -1)).unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let r = if kind == Kind::Half {
                    half::f16::from_f32(*w).to_f32()
                } else {
                    half::bf16::from_f32(*w).to_f32()
                };
                assert!(
                    g.to_bits() == r.to_bits() || (g.is_nan() && r.is_nan()),
                    "{config} {kind:?} {what}[{i}]: {g} is not {w} rounded ({r})"
                );
            }
        }
    }

    /// The documented CUDA results of bad inputs, without a host read: a FocalLoss label outside
    /// [0, C] gives NaN rows; an activated probability outside [0, 1] gives NaN elements.
    #[test]
    fn bad_labels_and_probabilities_give_nan() {
        on(EmulatedDevice::default(), || {
            let pred = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
            let labels = Tensor::from_slice(&[0i64, 7, 2, -1]);
            let none = LossArgs::new().reduction(Reduction::None);
            let l = FocalLoss::default()
                .forward(&pred, (&labels).into(), &none)
                .unwrap();
            let nan_rows = Vec::<bool>::try_from(l.isnan().any_dim(1, false)).unwrap();
            assert_eq!(nan_rows, vec![false, true, false, true]);
            let mean = FocalLoss::default()
                .forward(&pred, (&labels).into(), &LossArgs::new())
                .unwrap();
            assert!(mean.double_value(&[]).is_nan());

            let p = Tensor::from_slice(&[0.1f32, 1.5, 0.3, f32::NAN, 0.5, -0.2]).reshape([3, 2]);
            let labels = Tensor::from_slice(&[0i64, 1, 2]);
            let activated = FocalLoss {
                activated: true,
                ..Default::default()
            };
            let l = activated.forward(&p, (&labels).into(), &none).unwrap();
            let nan = Vec::<bool>::try_from(l.isnan().flatten(0, -1)).unwrap();
            assert_eq!(nan, vec![false, true, false, true, false, true]);
        });
    }
}

/// The CUDA kernels, run only when asked for: `cargo test --release --features gpu-tests` on a
/// machine with an NVIDIA GPU (sm_80 or newer).
#[cfg(feature = "gpu-tests")]
mod gpu {
    use super::*;

    fn cuda() -> Device {
        assert!(tch::Cuda::is_available(), "gpu-tests needs a CUDA device");
        Device::Cuda(0)
    }

    #[rstest]
    fn cuda_matches_unfused(
        #[values(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)] variant: usize,
        #[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind,
    ) {
        check_variant(variant, kind, cuda());
    }

    /// RetinaNet-sized input: fused CUDA against the float64 composition, and bitwise
    /// reproducible from run to run (no atomics).
    #[test]
    fn cuda_large_and_deterministic() {
        let d = cuda();
        let (n, c) = (400_000, 80);
        let inp = inputs(Tgt::Labels, false, n, c, Kind::Float, false);
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
        assert!(
            rel_err(&whole.to_device(Device::Cpu), &split.to_device(Device::Cpu)).unwrap() < 2e-2
        );
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
}
