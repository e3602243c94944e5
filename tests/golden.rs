//! Every reference case computed by MMDetection 3.3 (tests/data/mmdet_cases.json and
//! loss_cases.json) of every loss this crate ships passes through the public config API: loss and gradient within the README's
//! tolerances, GHM's momentum state after each call of a sequence, and every error case
//! rejected with MMDetection's message. The pipeline's reference cases (anchors, coder,
//! assigners, samplers, head targets) pass too (`golden/pipeline.rs`), and the batched pipeline
//! agrees with itself image by image (`golden/batching.rs`); so do the point priors and the
//! distance coder of the point-based heads (`golden/points.rs`).

use std::path::PathBuf;
use std::sync::Mutex;

use rstest::rstest;
use tch_detloss::golden::{run_case, CaseFile, Outcome};

#[path = "golden/batching.rs"]
mod batching;
#[path = "golden/pipeline.rs"]
mod pipeline;
#[path = "golden/points.rs"]
mod points;

/// Held by the tests that seed and draw from libtorch's global CPU generator.
static RNG: Mutex<()> = Mutex::new(());

fn data_dir() -> PathBuf {
    // The GPU check runs these binaries away from the source tree and points here.
    std::env::var_os("TCH_DETLOSS_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data"))
}

#[rstest]
#[case("FocalLoss", 45, 1)]
#[case("QualityFocalLoss", 7, 0)]
#[case("VarifocalLoss", 6, 0)]
#[case("CrossEntropyLoss", 22, 2)]
#[case("DistributionFocalLoss", 3, 0)]
#[case("GHMC", 7, 1)]
#[case("L1Loss", 7, 1)]
#[case("SmoothL1Loss", 16, 1)]
#[case("BalancedL1Loss", 15, 1)]
#[case("IoULoss", 18, 0)]
#[case("GIoULoss", 9, 1)]
#[case("DIoULoss", 6, 0)]
#[case("CIoULoss", 10, 0)]
#[case("GHMR", 8, 1)]
fn mmdetection_cases_pass(#[case] loss: &str, #[case] n_cases: usize, #[case] n_errors: usize) {
    cases_pass("mmdet_cases.json", loss, n_cases, n_errors);
}

/// The losses shipped from tests/data/loss_cases.json (tests/data/gen_loss_cases.py, every loss
/// of MMDetection 3.3 that mmdet_cases.json lacks; the golden runner lists the cases of the others).
#[rstest]
#[case("MSELoss", 5, 1)]
// GHM with momentum over 3 calls, float64 and float32: MMDetection's float32 `acc_sum` (a momentum
// float32 cannot hold) and GHMR's float32 total (fractional label weights).
#[case("GHMC", 3, 0)]
#[case("GHMR", 4, 0)]
fn more_mmdetection_cases_pass(
    #[case] loss: &str,
    #[case] n_cases: usize,
    #[case] n_errors: usize,
) {
    cases_pass("loss_cases.json", loss, n_cases, n_errors);
}

/// Every case of `loss` in the case file `name` passes, every error case is rejected with
/// MMDetection's message, and the file holds the expected counts.
fn cases_pass(name: &str, loss: &str, n_cases: usize, n_errors: usize) {
    let file = CaseFile::load(&data_dir().join(name)).unwrap();
    let cases: Vec<_> = file.cases.iter().filter(|c| c.loss == loss).collect();
    let errors: Vec<_> = file.error_cases.iter().filter(|c| c.loss == loss).collect();
    assert_eq!(
        (cases.len(), errors.len()),
        (n_cases, n_errors),
        "case counts of {loss}"
    );

    let mut failures = Vec::new();
    for case in &cases {
        match run_case(case) {
            Outcome::Pass { .. } => {}
            other => failures.push(format!("{}: {other:?}", case.name)),
        }
    }
    for case in &errors {
        match run_case(case) {
            Outcome::Rejected(msg) => {
                let want = case
                    .error
                    .as_ref()
                    .and_then(|e| e["message"].as_str())
                    .unwrap_or_default();
                assert!(
                    msg.contains(want),
                    "{}: rejected with {msg:?}, MMDetection says {want:?}",
                    case.name
                );
            }
            other => failures.push(format!("{}: {other:?}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len() + errors.len(),
        failures.join("\n")
    );
}
