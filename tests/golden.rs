//! Every reference case computed by MMDetection 3.3 (tests/data/mmdet_cases.json and
//! loss_cases.json) of every loss this crate ships passes through the public config API: loss and gradient within the README's
//! tolerances, GHM's momentum state after each call of a sequence, and every error case
//! rejected with MMDetection's message. The pipeline's reference cases (anchors, coder,
//! assigners, samplers, head targets) pass too (`golden/pipeline.rs`), and the batched pipeline
//! agrees with itself image by image (`golden/batching.rs`); so do the point priors and the
//! distance coder of the point-based heads (`golden/points.rs`).

use std::path::PathBuf;
use std::sync::Mutex;

use tch_detloss::golden::{run_case, Case, CaseFile, Outcome};

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

/// The case files of the losses (tests/data/README.md, tests/data/loss_cases.md).
const CASE_FILES: &[&str] = &["mmdet_cases.json", "loss_cases.json"];

/// Every shipped loss (the registered ones and DDQAuxLoss) has reference cases, and every case
/// of each passes: a new loss is checked here as soon as it is registered. The golden runner lists the cases
/// of the MMDetection losses not registered yet.
#[test]
fn every_shipped_loss_passes_its_mmdetection_cases() {
    let files: Vec<CaseFile> = CASE_FILES
        .iter()
        .map(|f| CaseFile::load(&data_dir().join(f)).unwrap())
        .collect();
    let mut failures = Vec::new();
    for loss in tch_detloss::golden::shipped_types() {
        let cases: Vec<_> = files
            .iter()
            .flat_map(|f| &f.cases)
            .filter(|c| c.loss == loss)
            .collect();
        let errors: Vec<_> = files
            .iter()
            .flat_map(|f| &f.error_cases)
            .filter(|c| c.loss == loss)
            .collect();
        if cases.is_empty() {
            failures.push(format!("{loss}: no reference case"));
        }
        failures.extend(cases_fail(&cases, &errors));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Each case's problem: a wrong result, or an error case accepted or rejected with another
/// message than MMDetection's.
fn cases_fail(cases: &[&Case], errors: &[&Case]) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        match run_case(case) {
            Outcome::Pass { .. } => {}
            other => failures.push(format!("{}: {other:?}", case.name)),
        }
    }
    for case in errors {
        match run_case(case) {
            Outcome::Rejected(msg) => {
                let want = case
                    .error
                    .as_ref()
                    .and_then(|e| e["message"].as_str())
                    .unwrap_or_default();
                // A KeyError's message is the repr of its key, quoted, and a registry's ends with
                // a pointer to mmengine's documentation: compared without either.
                let want =
                    if case.error.as_ref().and_then(|e| e["type"].as_str()) == Some("KeyError") {
                        let w = want.trim_matches('\'');
                        w.split(" More details can be found at").next().unwrap_or(w)
                    } else {
                        want
                    };
                if !msg.contains(want) {
                    failures.push(format!(
                        "{}: rejected with {msg:?}, MMDetection says {want:?}",
                        case.name
                    ));
                }
            }
            other => failures.push(format!("{}: {other:?}", case.name)),
        }
    }
    failures
}

/// The classifier helpers of the custom-channel losses (`get_cls_channels`, `get_activation`)
/// against the extras of their MMDetection cases.
#[test]
fn custom_loss_helpers_match_mmdetection() {
    use tch_detloss::golden::CaseTensor;
    use tch_detloss::losses::{CrossEntropyCustomLoss, FocalCustomLoss};
    use tch_detloss::registry::parse_config;
    let file = CaseFile::load(&data_dir().join("loss_cases.json")).unwrap();
    let tensor = |v: &serde_json::Value| {
        serde_json::from_value::<CaseTensor>(v.clone())
            .unwrap()
            .to_tensor()
            .unwrap()
    };
    let mut checked = 0;
    for case in &file.cases {
        let Some(out) = &case.outputs else { continue };
        let Some(want) = out.get("get_activation") else {
            continue;
        };
        let pred = tensor(&case.inputs["pred"]);
        let (got, channels) = match case.loss.as_str() {
            "FocalCustomLoss" => {
                let l: FocalCustomLoss = parse_config(&case.config).unwrap();
                (l.get_activation(&pred).unwrap(), l.get_cls_channels(4).ok())
            }
            "CrossEntropyCustomLoss" => {
                let l: CrossEntropyCustomLoss = parse_config(&case.config).unwrap();
                (l.get_activation(&pred).unwrap(), l.get_cls_channels(4).ok())
            }
            _ => continue,
        };
        let err = tch_detloss::golden::rel_err(&got, &tensor(want)).unwrap();
        assert!(err <= 1e-12, "{}: get_activation off by {err:e}", case.name);
        if let Some(want) = out.get("get_cls_channels") {
            let want = tensor(want).int64_value(&[]);
            assert_eq!(channels, Some(want), "{}: get_cls_channels", case.name);
        }
        checked += 1;
    }
    assert_eq!(checked, 4, "cases with get_activation");
}
