//! The device executor (kernels/kernels.cu) and the launch plan of the CUDA path, run on the
//! emulated device over CPU tensors: every test run executes what a GPU runs.

use rstest::rstest;
use tch::{Device, Kind, Tensor};
use tch_detloss::losses::FocalLoss;
use tch_detloss::{registry, AvgFactor, Loss, LossArgs, Reduction};

use crate::common::{assert_close, check_variant, config, inputs, rng_lock, variant, Inputs};
use tch_detloss::testing::{with_emulated_device, EmulatedDevice};

fn on<R>(d: EmulatedDevice, f: impl FnOnce() -> R) -> R {
    assert!(
        tch_detloss::testing::emulated_device_built(),
        "this build has no emulated device: the CUDA headers were not found (run scripts/setup.sh)"
    );
    with_emulated_device(d, f)
}

/// Every variant of `common::VARIANTS`, fused on the emulated device against the unfused
/// composition: the element, row, box and histogram device executors, every dtype; one test per
/// variant (`emulated::device::<variant>`).
mod device {
    use super::*;

    macro_rules! emulated {
        ($($name:ident)*) => {$(
            #[rstest]
            fn $name(#[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind) {
                on(EmulatedDevice::default(), || {
                    check_variant(stringify!($name), kind, Device::Cpu)
                });
            }
        )*};
    }

    for_each_variant!(emulated);
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
        let grad = Tensor::run_backward(&[&(&out * &up).sum(out.kind())], &[&pred], false, false)
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
    #[values(
        "focal",
        "qfl",
        "qfl_dense_b1_lw2",
        "vfl",
        "ce_softmax_cw_ignore255_avgnonignore_lw2",
        "ce_sigmoid_labels_ignore255_avgnonignore",
        "dfl",
        "ghmc_bins30_mom0_75_dense"
    )]
    name: &str,
    #[values(Kind::Float, Kind::Double, Kind::BFloat16)] kind: Kind,
) {
    let _rng = rng_lock();
    tch::manual_seed(7 + name.len() as i64);
    let v = variant(name);
    let (n, c) = (401, 80); // 126 blocks of 256 threads, the last one partly idle
    let config = &config(v, c);
    let inp = inputs(v, n, c, kind, false);
    // A weight per anchor, in the shape each loss broadcasts.
    let w_shape: &[i64] = if config.contains("Varifocal") || config.contains("GHMC") {
        &[n, 1]
    } else {
        &[n]
    };
    let w = Tensor::rand(w_shape, (Kind::Double, Device::Cpu)).to_kind(kind);
    let reductions: &[Reduction] = if config.contains("GHMC") {
        &[Reduction::None, Reduction::Mean] // 'sum' is an error
    } else {
        &[Reduction::None, Reduction::Mean, Reduction::Sum]
    };
    for &red in reductions {
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
    #[values("focal", "focal_activated", "qfl", "vfl", "ce_softmax", "dfl")] name: &str,
    #[values(Kind::Half, Kind::BFloat16)] kind: Kind,
) {
    let _rng = rng_lock();
    tch::manual_seed(11 + name.len() as i64);
    let v = variant(name);
    let config = &config(v, 7);
    let half = inputs(v, 300, 7, kind, false);
    let single = half.to_kind(Kind::Float);
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
