//! `make bench-dist`: all-reduce latency and throughput of `tch_detloss::dist` against
//! torch.distributed in Python, on Gloo, in the same run. For each round it starts 2 local ranks
//! under the set-up's torchrun three times: Rust with the cross-rank check of every collective
//! (the default), Rust without it, and `benches/dist/ref.py`; it reports the median of the
//! rounds per size and writes `target/dist-bench/report.json`.
//!
//! ```sh
//! cargo bench --bench dist -- [--rounds N] [--nproc N]
//! ```
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tch_detloss::dist::{GroupOptions, ProcessGroup, ReduceOp};

/// 4 B, 1 MiB and 64 MiB of float32, and the timed iterations of each.
const SIZES: [usize; 3] = [4, 1 << 20, 64 << 20];
const ITERS: [usize; 3] = [500, 100, 10];

fn worker(checked: bool) -> Result<()> {
    tch::set_num_threads(1);
    let g = ProcessGroup::from_env(&GroupOptions {
        check_collectives: checked,
        ..Default::default()
    })?;
    let mut rows = Vec::new();
    for (&bytes, &n) in SIZES.iter().zip(&ITERS) {
        // Zeros: hundreds of doublings of anything else would overflow.
        let x = Tensor::zeros([(bytes / 4).max(1) as i64], (Kind::Float, Device::Cpu));
        for _ in 0..3 {
            g.all_reduce(&x, ReduceOp::Sum)?.wait(None)?;
        }
        g.barrier()?.wait(None)?;
        let t0 = Instant::now();
        for _ in 0..n {
            g.all_reduce(&x, ReduceOp::Sum)?.wait(None)?;
        }
        let dt = t0.elapsed().as_secs_f64() / n as f64;
        if x.double_value(&[0]) != 0.0 {
            bail!("all_reduce of zeros gave {}", x.double_value(&[0]));
        }
        rows.push(json!({"bytes": x.numel() * 4, "iters": n, "seconds": dt}));
    }
    if g.rank() == 0 {
        let name = if checked {
            "tch_detloss::dist (checked)"
        } else {
            "tch_detloss::dist (check_collectives: false)"
        };
        println!(
            "DIST_BENCH {}",
            json!({"impl": name, "world": g.world_size(), "rows": rows})
        );
    }
    Ok(())
}

/// Runs one torchrun launch and returns rank 0's report.
fn launch(torchrun: &str, nproc: usize, args: &[String], unchecked: bool) -> Result<Value> {
    let mut cmd = Command::new(torchrun);
    cmd.args(["--standalone", "--nproc-per-node", &nproc.to_string()])
        .args(args);
    // Loopback, for both sides alike, unless told otherwise.
    if std::env::var_os("GLOO_SOCKET_IFNAME").is_none() {
        cmd.env("GLOO_SOCKET_IFNAME", "lo");
    }
    if unchecked {
        cmd.env("DIST_BENCH_UNCHECKED", "1");
    } else {
        cmd.env_remove("DIST_BENCH_UNCHECKED");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {torchrun} (run `make setup` first)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "torchrun {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("DIST_BENCH "))
        .with_context(|| format!("no report from torchrun {args:?}:\n{stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    if std::env::var_os("WORLD_SIZE").is_some() {
        return worker(std::env::var_os("DIST_BENCH_UNCHECKED").is_none());
    }
    let mut rounds = 3;
    let mut nproc = 2;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            "--nproc" => nproc = args.next().context("--nproc N")?.parse()?,
            "--bench" => {}
            _ => bail!("usage: cargo bench --bench dist -- [--rounds N] [--nproc N]"),
        }
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let torchrun =
        std::env::var("TORCHRUN").unwrap_or_else(|_| format!("{root}/.venv/bin/torchrun"));
    let exe = std::env::current_exe()?.display().to_string();
    let sizes = SIZES.map(|s| s.to_string()).join(",");
    let iters = ITERS.map(|s| s.to_string()).join(",");
    let py = format!("{root}/benches/dist/ref.py");
    let kinds: [(&str, Vec<String>, bool); 3] = [
        ("rust", vec!["--no-python".into(), exe.clone()], false),
        ("rust-unchecked", vec!["--no-python".into(), exe], true),
        ("python", vec![py, sizes, iters], false),
    ];
    let start = Instant::now();
    let mut results: Vec<(String, Vec<Vec<f64>>)> = Vec::new();
    for round in 0..rounds {
        for (i, (_, a, unchecked)) in kinds.iter().enumerate() {
            let r = launch(&torchrun, nproc, a, *unchecked)?;
            let secs: Vec<f64> = r["rows"]
                .as_array()
                .context("rows")?
                .iter()
                .map(|x| x["seconds"].as_f64().unwrap_or(f64::NAN))
                .collect();
            if round == 0 {
                results.push((r["impl"].as_str().unwrap_or("?").to_string(), Vec::new()));
            }
            results[i].1.push(secs);
        }
        eprintln!(
            "round {} of {rounds} done ({:.0} s)",
            round + 1,
            start.elapsed().as_secs_f64()
        );
    }
    let label = |b: usize| match b {
        4 => "4 B".to_string(),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{b} B"),
    };
    println!(
        "\nall_reduce(sum) of float32 on Gloo, {nproc} local ranks, median of {rounds} rounds (ms per op; GB/s = bytes / time)\n"
    );
    print!("| implementation |");
    for &b in &SIZES {
        print!(" {} |", label(b));
    }
    println!("\n|---|{}", "---|".repeat(SIZES.len()));
    let mut report = Vec::new();
    for (name, runs) in &results {
        print!("| {name} |");
        let mut rows = Vec::new();
        for (j, &b) in SIZES.iter().enumerate() {
            let m = median(runs.iter().map(|r| r[j]).collect());
            let gbs = b as f64 / m / 1e9;
            if b > 4 {
                print!(" {:.3} ms, {gbs:.2} GB/s |", m * 1e3);
            } else {
                print!(" {:.3} ms |", m * 1e3);
            }
            rows.push(json!({"bytes": b, "median_seconds": m, "gb_per_s": gbs,
                             "rounds": runs.iter().map(|r| r[j]).collect::<Vec<_>>()}));
        }
        println!();
        report.push(json!({"impl": name, "rows": rows}));
    }
    let dir = format!("{root}/target/dist-bench");
    std::fs::create_dir_all(&dir)?;
    let path = format!("{dir}/report.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(
            &json!({"nproc": nproc, "rounds": rounds, "results": report}),
        )?,
    )?;
    println!("\nwrote {path} ({:.0} s)", start.elapsed().as_secs_f64());
    Ok(())
}
