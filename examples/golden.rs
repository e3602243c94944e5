//! Runs a case file of MMDetection reference outputs through the public config API.
//!
//! `cargo run --release --example golden -- FILE [--only Loss1,Loss2]`
//!
//! Prints every case, the worst error per loss, the cases of losses not supported yet, and ends
//! with `N passed, M failed`; exits non-zero when anything failed.

use std::collections::BTreeMap;
use std::process::ExitCode;

use tch_detloss::golden::{run_case, CaseFile, Outcome};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut file = None;
    let mut only: Option<Vec<String>> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--only" => {
                only = args
                    .next()
                    .map(|s| s.split(',').map(str::to_string).collect())
            }
            "-h" | "--help" => {
                println!("usage: golden FILE [--only Loss1,Loss2]");
                return ExitCode::SUCCESS;
            }
            _ => file = Some(a),
        }
    }
    let Some(file) = file else {
        eprintln!("usage: golden FILE [--only Loss1,Loss2]");
        return ExitCode::from(2);
    };
    let cases = match CaseFile::load(std::path::Path::new(&file)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let selected = |loss: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == loss));

    let (mut passed, mut failed) = (0usize, 0usize);
    let mut worst: BTreeMap<String, (usize, f64, f64)> = BTreeMap::new();
    let mut unsupported: BTreeMap<String, usize> = BTreeMap::new();
    for case in cases
        .cases
        .iter()
        .chain(&cases.error_cases)
        .filter(|c| selected(&c.loss))
    {
        let outcome = run_case(case);
        match &outcome {
            Outcome::Pass { loss_err, grad_err } => {
                passed += 1;
                let w = worst.entry(case.loss.clone()).or_default();
                w.0 += 1;
                w.1 = w.1.max(*loss_err);
                w.2 = w.2.max(*grad_err);
                println!(
                    "PASS  {:<48} loss {loss_err:.2e}  grad {grad_err:.2e}",
                    case.name
                );
            }
            Outcome::Rejected(msg) => {
                passed += 1;
                worst.entry(case.loss.clone()).or_default().0 += 1;
                println!("PASS  {:<48} rejected: {msg}", case.name);
            }
            Outcome::Fail(msg) => {
                failed += 1;
                println!("FAIL  {:<48} {msg}", case.name);
            }
            Outcome::Unsupported => *unsupported.entry(case.loss.clone()).or_default() += 1,
        }
    }
    println!();
    println!(
        "{:<24} {:>6} {:>12} {:>12}",
        "loss", "cases", "worst loss", "worst grad"
    );
    for (loss, (n, l, g)) in &worst {
        println!("{loss:<24} {n:>6} {l:>12.2e} {g:>12.2e}");
    }
    if !unsupported.is_empty() {
        let list: Vec<String> = unsupported
            .iter()
            .map(|(l, n)| format!("{l} ({n})"))
            .collect();
        println!(
            "not supported yet, {} cases: {}",
            unsupported.values().sum::<usize>(),
            list.join(", ")
        );
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
