//! `--pytorch`: MMDetection's own loss code (`pytorch_losses.py`, op for op from MMDetection
//! 3.3) timed in the set-up's PyTorch, eager and under `torch.compile`, on the very inputs of the
//! CPU rows, which this side writes as safetensors files.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::Tensor;

use crate::report::Row;
use crate::workloads::{Inputs, TargetData, Workload};

/// The losses the Python side has.
const PORTED: &[&str] = &["FocalLoss", "GIoULoss", "SmoothL1Loss", "L1Loss"];

pub struct Batch {
    dir: PathBuf,
    cases: Vec<Value>,
}

impl Batch {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cases: Vec::new(),
        })
    }

    /// Writes a CPU case's inputs for the Python side, if it has that loss.
    pub fn add(&mut self, w: &Workload, x: &Inputs) -> Result<()> {
        let config: Value = serde_json::from_str(w.config)?;
        let ty = config["type"].as_str().unwrap_or_default().to_string();
        let TargetData::One(target) = &x.target else {
            return Ok(());
        };
        if !PORTED.contains(&ty.as_str()) {
            return Ok(());
        }
        let path = self
            .dir
            .join(format!("{}.safetensors", w.name.replace(' ', "_")));
        let pred = x.pred.detach();
        let mut named: Vec<(&str, &Tensor)> = vec![("pred", &pred), ("target", target)];
        if let Some(wt) = &x.weight {
            named.push(("weight", wt));
        }
        if let Some(a) = &x.avg_factor {
            named.push(("avg_factor", a));
        }
        Tensor::write_safetensors(&named, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        self.cases
            .push(json!({"name": w.name, "type": ty, "config": config, "inputs": path}));
        Ok(())
    }

    /// Runs the Python side and fills the forward+backward rows' PyTorch columns.
    pub fn run(self, rows: &mut [Row], reps: usize, compile: bool) -> Result<()> {
        if self.cases.is_empty() {
            println!(
                "--pytorch: none of the losses profiled is ported to the Python side ({PORTED:?})"
            );
            return Ok(());
        }
        let manifest = self.dir.join("manifest.json");
        let m = json!({"cases": self.cases, "warmup": 3, "reps": reps, "compile": compile,
                       "threads": tch::get_num_threads()});
        std::fs::write(&manifest, serde_json::to_string_pretty(&m)?)?;
        let python = python();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/profile/pytorch_losses.py"
        );
        eprintln!(
            "--pytorch: {} losses in {} (eager{})",
            self.cases.len(),
            python.display(),
            if compile {
                " and torch.compile; compiling takes a while"
            } else {
                ""
            }
        );
        let out = Command::new(&python)
            .arg(script)
            .arg(&manifest)
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        if !out.status.success() {
            bail!(
                "--pytorch: {} failed:\n{}",
                script,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let r: Value =
                serde_json::from_str(line).with_context(|| format!("--pytorch output {line:?}"))?;
            let name = r["loss"].as_str().unwrap_or_default();
            if let Some(note) = r["note"].as_str() {
                println!("--pytorch: {name}: {note}");
            }
            for row in rows.iter_mut().filter(|row| {
                row.loss == name && row.device == "cpu" && row.pass == "forward+backward"
            }) {
                row.pytorch_eager_ms = r["eager_ms"].as_f64();
                row.pytorch_compiled_ms = r["compiled_ms"].as_f64();
                println!(
                    "  {:<26} PyTorch eager {:>9.3} ms, torch.compile {:>9} ms, fused {:>8.3} ms: {:.2}x and {} faster",
                    name,
                    row.pytorch_eager_ms.unwrap_or(f64::NAN),
                    row.pytorch_compiled_ms.map_or_else(|| "-".to_string(), |v| format!("{v:.3}")),
                    row.fused_ms,
                    row.pytorch_eager_ms.unwrap_or(f64::NAN) / row.fused_ms,
                    row.pytorch_compiled_ms.map_or_else(|| "-".to_string(), |v| format!("{:.2}x", v / row.fused_ms)),
                );
            }
        }
        Ok(())
    }
}

/// The set-up's Python: beside the libtorch that `.cargo/config.toml` names (LIBTORCH is
/// `<venv>/lib/pythonX.Y/site-packages/torch`), else TCH_DETLOSS_PYTHON, else python3.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TCH_DETLOSS_PYTHON") {
        return p.into();
    }
    if let Some(lib) = std::env::var_os("LIBTORCH") {
        if let Some(venv) = Path::new(&lib).ancestors().nth(4) {
            let p = venv.join("bin/python");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("python3")
}
