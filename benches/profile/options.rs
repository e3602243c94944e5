//! The command line of the profile command.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};

pub const USAGE: &str = "\
usage: cargo bench --bench profile [-- OPTIONS]

Times the fused losses against their stock-op compositions (forward, backward, both) on every
device present, prints a table and writes the rows as JSON.

options:
  --quick          small shapes and few repetitions (a smoke test)
  --device D       cpu, cuda (every CUDA device) or cuda:K; default: all present
  --n N            rows; default: each loss's own (40000 anchors on the CPU, 1600000 on CUDA)
  --c C            classes (or bins); default: each loss's own
  --loss L[,L..]   only these losses (a prefix of the row name, e.g. CrossEntropyLoss)
  --reps R         timed repetitions; default 25 on the CPU, 50 on CUDA
  --warmup W       untimed repetitions before them; default 3 on the CPU, 10 on CUDA
  --threads T      torch's intra-op threads on the CPU (default: torch's choice)
  --json PATH      where to write the JSON rows (default: target/profile/report.json); the
                   Markdown table (.md) and the chart (.png) go beside it
  --trace DIR      also write a Chrome/Perfetto trace of one fused and one unfused
                   forward+backward per loss to DIR (open at ui.perfetto.dev)
  --pytorch        also time MMDetection's loss code (benches/profile/pytorch_losses.py) in the
                   set-up's PyTorch, eager and under torch.compile, on the same inputs (CPU rows;
                   FocalLoss, GIoULoss, SmoothL1Loss, L1Loss); adds columns and bars
  --no-compile     with --pytorch: eager only
  --baseline FILE  an earlier report.json: print what got slower than there by more than the
                   run-to-run noise of both runs
  -h, --help       this text";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU and every CUDA device (CUDA silently skipped when there is none).
    All,
    Cpu,
    /// Every CUDA device, or one.
    Cuda(Option<usize>),
}

#[derive(Debug)]
pub struct Options {
    pub quick: bool,
    pub device: DeviceChoice,
    pub n: Option<i64>,
    pub c: Option<i64>,
    pub loss: Option<Vec<String>>,
    pub reps: Option<usize>,
    pub warmup: Option<usize>,
    pub threads: Option<i32>,
    pub json: PathBuf,
    /// An earlier report.json to compare with.
    pub baseline: Option<PathBuf>,
    /// Where to write one traced fused and one unfused forward+backward per loss.
    pub trace: Option<PathBuf>,
    /// Also time MMDetection's loss code in PyTorch eager and under torch.compile.
    pub pytorch: bool,
    /// With --pytorch: skip torch.compile (it compiles for minutes on a small machine).
    pub no_compile: bool,
}

impl Options {
    /// A workload's shape: its own (a tenth of the rows with --quick), or --n / --c.
    pub fn shape(&self, (n, c): (i64, i64)) -> (i64, i64) {
        let n = self
            .n
            .unwrap_or(if self.quick { (n / 10).max(1) } else { n });
        (n, self.c.unwrap_or(c))
    }

    /// Whether the workload `name` was asked for (all, without --loss).
    pub fn wants(&self, name: &str) -> bool {
        self.loss
            .as_ref()
            .is_none_or(|l| l.iter().any(|p| name.starts_with(p.as_str())))
    }

    /// Parses the arguments after `--`; `None` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>> {
        let mut o = Options {
            quick: false,
            device: DeviceChoice::All,
            n: None,
            c: None,
            loss: None,
            reps: None,
            warmup: None,
            threads: None,
            json: PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/profile/report.json"
            )),
            baseline: None,
            trace: None,
            pytorch: false,
            no_compile: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            // Both `--key value` and `--key=value`.
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => args
                        .next()
                        .with_context(|| format!("{name} needs a value\n\n{USAGE}")),
                }
            };
            match key.as_str() {
                // cargo passes `--bench` to every bench binary.
                "--bench" => {}
                "-h" | "--help" => return Ok(None),
                "--quick" => o.quick = true,
                "--device" => o.device = parse_device(&value("--device")?)?,
                "--n" => o.n = Some(parse_positive(&key, &value(&key)?)?),
                "--c" => o.c = Some(parse_positive(&key, &value(&key)?)?),
                "--loss" => o.loss = Some(value(&key)?.split(',').map(str::to_string).collect()),
                "--reps" => o.reps = Some(parse_positive(&key, &value(&key)?)? as usize),
                "--warmup" => {
                    let v = value(&key)?;
                    o.warmup = Some(
                        v.parse()
                            .with_context(|| format!("--warmup: {v:?} is not a count"))?,
                    );
                }
                "--threads" => {
                    let t = parse_positive(&key, &value(&key)?)?;
                    o.threads = Some(i32::try_from(t).context("--threads: too large")?);
                }
                "--json" => o.json = PathBuf::from(value(&key)?),
                "--baseline" => o.baseline = Some(PathBuf::from(value(&key)?)),
                "--trace" => o.trace = Some(PathBuf::from(value(&key)?)),
                "--pytorch" => o.pytorch = true,
                "--no-compile" => o.no_compile = true,
                _ => bail!("unknown argument {arg:?}\n\n{USAGE}"),
            }
        }
        Ok(Some(o))
    }
}

fn parse_device(s: &str) -> Result<DeviceChoice> {
    Ok(match s {
        "cpu" => DeviceChoice::Cpu,
        "cuda" => DeviceChoice::Cuda(None),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(k)) => DeviceChoice::Cuda(Some(k)),
            _ => bail!("--device: expected cpu, cuda or cuda:K, got {s:?}"),
        },
    })
}

fn parse_positive(name: &str, s: &str) -> Result<i64> {
    let v: i64 = s
        .parse()
        .with_context(|| format!("{name}: {s:?} is not an integer"))?;
    ensure!(v > 0, "{name} must be positive, got {v}");
    Ok(v)
}
