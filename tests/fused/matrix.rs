//! Each loss family, fused, against its unfused composition in float64: every named variant of
//! `common::VARIANTS`, every dtype.

use rstest::rstest;
use tch::{Device, Kind};

use crate::common::check_variant;

#[rstest]
#[case::focal("focal")]
#[case::focal_g1_5_a0_5("focal_g1.5_a0.5")]
#[case::focal_g0("focal_g0")]
#[case::focal_dense_lw0_5("focal_dense_lw0.5")]
#[case::focal_activated("focal_activated")]
#[case::focal_activated_dense_g1_5("focal_activated_dense_g1.5")]
fn focal_loss(
    #[case] name: &str,
    #[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind,
) {
    check_variant(name, kind, Device::Cpu);
}

#[rstest]
#[case::qfl("qfl")]
#[case::qfl_dense_b1_lw2("qfl_dense_b1_lw2")]
#[case::qfl_activated("qfl_activated")]
#[case::qfl_activated_dense_b1_5("qfl_activated_dense_b1.5")]
#[case::vfl("vfl")]
#[case::vfl_plain_g1_5_a0_5("vfl_plain_g1.5_a0.5")]
fn quality_and_varifocal_loss(
    #[case] name: &str,
    #[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind,
) {
    check_variant(name, kind, Device::Cpu);
}

#[rstest]
#[case::softmax("ce_softmax")]
#[case::softmax_cw_ignore255_avgnonignore_lw2("ce_softmax_cw_ignore255_avgnonignore_lw2")]
#[case::sigmoid_labels_ignore255_avgnonignore("ce_sigmoid_labels_ignore255_avgnonignore")]
#[case::sigmoid_dense_cw("ce_sigmoid_dense_cw")]
#[case::sigmoid_column("ce_sigmoid_column")]
fn cross_entropy_loss(
    #[case] name: &str,
    #[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind,
) {
    check_variant(name, kind, Device::Cpu);
}

#[rstest]
#[case::dfl("dfl")]
#[case::dfl_sum_lw0_25("dfl_lw0.25")]
#[case::ghmc("ghmc")]
#[case::ghmc_bins30_mom0_75_dense("ghmc_bins30_mom0.75_dense")]
fn distribution_focal_loss_and_ghmc(
    #[case] name: &str,
    #[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind,
) {
    check_variant(name, kind, Device::Cpu);
}

#[rstest]
#[case::l1("l1")]
#[case::smooth_l1_b0_11_lw2("smooth_l1_b0.11_lw2")]
#[case::balanced_l1("balanced_l1")]
#[case::balanced_l1_a0_3_g2_b0_5("balanced_l1_a0.3_g2_b0.5")]
#[case::mse("mse")]
#[case::mse_sum_lw0_5("mse_sum_lw0.5")]
#[case::ghmr("ghmr")]
#[case::ghmr_mu0_1_bins5_mom0_7("ghmr_mu0.1_bins5_mom0.7")]
fn l1_family_and_ghmr(
    #[case] name: &str,
    #[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind,
) {
    check_variant(name, kind, Device::Cpu);
}

#[rstest]
#[case::iou_log("iou_log")]
#[case::iou_linear("iou_linear")]
#[case::iou_square_eps0_01("iou_square_eps0.01")]
#[case::giou("giou")]
#[case::giou_eps0_01_lw5("giou_eps0.01_lw5")]
#[case::diou("diou")]
#[case::ciou("ciou")]
#[case::ciou_eps0_01("ciou_eps0.01")]
fn iou_family(
    #[case] name: &str,
    #[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind,
) {
    check_variant(name, kind, Device::Cpu);
}
