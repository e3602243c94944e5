//! Timing: medians of interleaved repetitions, with the device synchronized around the clock on
//! CUDA, and the reference bandwidth of a device-to-device copy.

use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

/// Size of the tensor whose device-to-device copy gives the reference bandwidth.
const COPY_BYTES: i64 = 1 << 30;

/// Times closures on one device: wall clock, with a device synchronization on both ends on CUDA.
pub struct Clock {
    pub cuda: Option<i64>,
    pub warmup: usize,
    pub reps: usize,
}

/// The timed region of one call: the closure under test starts and stops it, so that it can
/// prepare its inputs (run the forward pass before timing the backward) outside the clock.
pub struct Stopwatch {
    cuda: Option<i64>,
    started: Option<Instant>,
    ms: Option<f64>,
}

impl Stopwatch {
    fn sync(&self) {
        if let Some(k) = self.cuda {
            tch::Cuda::synchronize(k);
        }
    }

    /// Waits for the device to finish the work queued so far, then starts the clock.
    pub fn start(&mut self) {
        self.sync();
        self.started = Some(Instant::now());
    }

    /// Waits for the device to finish the timed work, then stops the clock.
    pub fn stop(&mut self) {
        self.sync();
        if let Some(t) = self.started {
            self.ms = Some(t.elapsed().as_secs_f64() * 1e3);
        }
    }
}

impl Clock {
    /// Milliseconds of one call's timed region; what the call returns is dropped afterwards.
    fn once<T>(&self, f: &mut impl FnMut(&mut Stopwatch) -> Result<T>) -> Result<f64> {
        let mut sw = Stopwatch {
            cuda: self.cuda,
            started: None,
            ms: None,
        };
        drop(f(&mut sw)?);
        sw.ms
            .context("internal error: a timed closure did not start and stop its stopwatch")
    }

    /// Times two closures interleaved, `a b b a a b ...`, after `warmup` untimed calls of each,
    /// so that both see the same machine: a background load that comes and goes (a 2-core
    /// laptop, a shared CI runner) then slows both alike instead of whichever ran during it.
    pub fn time_pair<A, B>(
        &self,
        mut a: impl FnMut(&mut Stopwatch) -> Result<A>,
        mut b: impl FnMut(&mut Stopwatch) -> Result<B>,
    ) -> Result<(Timing, Timing)> {
        for _ in 0..self.warmup {
            self.once(&mut a)?;
            self.once(&mut b)?;
        }
        let (mut ms_a, mut ms_b) = (Vec::with_capacity(self.reps), Vec::with_capacity(self.reps));
        for i in 0..self.reps {
            if i % 2 == 0 {
                ms_a.push(self.once(&mut a)?);
                ms_b.push(self.once(&mut b)?);
            } else {
                ms_b.push(self.once(&mut b)?);
                ms_a.push(self.once(&mut a)?);
            }
        }
        Ok((Timing::of(&mut ms_a), Timing::of(&mut ms_b)))
    }

    /// Times one closure the same way.
    pub fn time<T>(&self, mut f: impl FnMut(&mut Stopwatch) -> Result<T>) -> Result<Timing> {
        for _ in 0..self.warmup {
            self.once(&mut f)?;
        }
        let mut ms = (0..self.reps)
            .map(|_| self.once(&mut f))
            .collect::<Result<Vec<_>>>()?;
        Ok(Timing::of(&mut ms))
    }
}

/// Runs `forward` outside the clock, then times `backward` of its result.
pub fn backward_of<T>(
    forward: impl Fn() -> Result<Tensor>,
    backward: impl Fn(&Tensor) -> Result<T>,
) -> impl FnMut(&mut Stopwatch) -> Result<T> {
    move |sw| {
        let loss = forward()?;
        sw.start();
        let out = backward(&loss);
        sw.stop();
        out
    }
}

/// Times `f` as a whole.
pub fn whole<T>(mut f: impl FnMut() -> Result<T>) -> impl FnMut(&mut Stopwatch) -> Result<T> {
    move |sw| {
        sw.start();
        let out = f();
        sw.stop();
        out
    }
}

/// Milliseconds of one timed closure.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_ms: f64,
    /// The fastest repetition: far below the median means a noisy machine.
    pub min_ms: f64,
    /// The repetitions' interquartile range over their median: the run-to-run noise that a
    /// comparison with an earlier report must exceed.
    pub spread: f64,
}

impl Timing {
    fn of(ms: &mut [f64]) -> Self {
        let median_ms = median(ms); // sorts
        let q = |f: f64| {
            ms.get(((ms.len() - 1) as f64 * f).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Self {
            median_ms,
            min_ms: ms.first().copied().unwrap_or(f64::NAN),
            spread: if ms.is_empty() {
                f64::NAN
            } else {
                (q(0.75) - q(0.25)) / median_ms
            },
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// The achieved bandwidth (read + write bytes per second, in GB/s) of a device-to-device copy
/// of a 1 GiB float32 tensor: the reference for a memory-bound kernel on this card.
pub fn copy_gbps(ordinal: usize) -> Result<f64> {
    let device = Device::Cuda(ordinal);
    let numel = COPY_BYTES / 4;
    let src = Tensor::f_rand([numel], (Kind::Float, device))?;
    let mut dst = Tensor::f_empty([numel], (Kind::Float, device))?;
    let clock = Clock {
        cuda: Some(ordinal as i64),
        warmup: 3,
        reps: 20,
    };
    let t = clock.time(whole(|| Ok(dst.f_copy_(&src)?)))?;
    Ok(2.0 * COPY_BYTES as f64 / (t.median_ms * 1e-3) / 1e9)
}
