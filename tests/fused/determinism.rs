//! Results that do not depend on the number of CPU threads: the chunking is fixed by the shape
//! and the partials are added in order, for every executor shape.

use tch::{Kind, Tensor};
use tch_detloss::{registry, LossArgs};

use crate::common::{config, inputs, rng_lock, variant, weights};

/// Every executor shape gives bitwise the same loss and gradient on 1 and 2 threads.
#[rstest::rstest]
#[case::element_focal("focal", 5000, 80)]
#[case::row_ce_softmax("ce_softmax_cw_ignore255_avgnonignore_lw2", 3000, 1204)]
#[case::element_ce_sigmoid("ce_sigmoid_labels_ignore255_avgnonignore", 5000, 80)]
#[case::row_dfl("dfl", 40000, 17)]
#[case::histogram_ghmc("ghmc_bins30_mom0_75_dense", 5000, 80)]
#[case::element_smooth_l1("smooth_l1_b0_11_lw2", 60000, 4)]
#[case::box_giou("giou", 60000, 4)]
#[case::box_ciou("ciou", 60000, 4)]
#[case::histogram_ghmr("ghmr_mu0_1_bins5_mom0_7", 60000, 4)]
fn cpu_result_is_bitwise_independent_of_threads(
    #[case] name: &str,
    #[case] n: i64,
    #[case] c: i64,
) {
    let v = variant(name);
    let inp = {
        let _rng = rng_lock();
        tch::manual_seed(3);
        inputs(v, n, c, Kind::Float, false)
    };
    let weights = weights(v, n, c);
    // The last weight of the variant that is not all zeros (the short-cut).
    let w = weights
        .iter()
        .rev()
        .find(|(name, _)| !name.contains("zeros"))
        .and_then(|(_, w)| w.as_ref())
        .map(|w| w.to_kind(Kind::Float));
    let run = |threads: i32| {
        tch::set_num_threads(threads);
        let loss = registry::build_str(&config(v, c)).unwrap();
        let pred = inp.pred.detach().set_requires_grad(true);
        let mut args = LossArgs::new();
        if let Some(w) = &w {
            args = args.weight(w);
        }
        let l = loss.forward(&pred, inp.target(), &args).unwrap();
        l.backward();
        let state: Vec<Tensor> = loss.state().unwrap().into_iter().map(|(_, t)| t).collect();
        (l.double_value(&[]), pred.grad(), state)
    };
    let (l1, g1, s1) = run(1);
    let (l2, g2, s2) = run(2);
    tch::set_num_threads(2);
    assert_eq!(l1.to_bits(), l2.to_bits(), "{name}: loss");
    assert!(g1.equal(&g2), "{name}: grad");
    assert_eq!(s1.len(), s2.len());
    for (a, b) in s1.iter().zip(&s2) {
        assert!(a.equal(b), "{name}: state");
    }
}
