//! The CUDA side of the executor: the embedded fatbin, loaded once per device through cudarc
//! into the primary context (the one libtorch uses), and launches on torch's current stream.
//!
//! Nothing here reads a device value back to the host, so a training step that calls a loss
//! stays asynchronous and capturable in a CUDA graph.

pub use crate::ptxas::KernelReport;

/// Whether this build carries CUDA kernels (nvcc was found at build time).
pub fn kernels_built() -> bool {
    cfg!(dl_cuda_kernels)
}

/// What ptxas reported for each embedded kernel (registers, spills); empty without kernels.
pub fn ptxas_report() -> Vec<KernelReport> {
    #[cfg(dl_cuda_kernels)]
    let log = include_str!(concat!(env!("OUT_DIR"), "/ptxas.log"));
    #[cfg(not(dl_cuda_kernels))]
    let log = "";
    crate::ptxas::parse(log)
}

#[cfg(not(dl_cuda_kernels))]
pub(crate) fn launch(
    _: &str,
    _: crate::fused::Pass,
    _: tch::Kind,
    _: tch::Kind,
    _: usize,
    _: &mut crate::fused::DlArgs,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "tch-detloss was built without CUDA kernels (nvcc was not found at build time): run \
         scripts/setup.sh, or set TCH_DETLOSS_NVCC or CUDA_HOME to a CUDA 13 nvcc, and rebuild"
    )
}

#[cfg(dl_cuda_kernels)]
pub(crate) use imp::launch;

#[cfg(dl_torch_cuda)]
extern "C" {
    fn dl_cuda_allocated_bytes(device: i32, current: *mut i64, peak: *mut i64) -> i32;
    fn dl_cuda_reset_peak_bytes(device: i32) -> i32;
}

/// Bytes held by libtorch's CUDA caching allocator on a device: `(current, peak since the last
/// [`reset_peak_allocated`])`. `None` where the build has no CUDA side or CUDA is not initialized.
pub fn allocated_bytes(ordinal: usize) -> Option<(u64, u64)> {
    #[cfg(dl_torch_cuda)]
    {
        let (mut current, mut peak) = (0i64, 0i64);
        // SAFETY: reads the allocator's counters; errors come back as -1.
        if unsafe { dl_cuda_allocated_bytes(ordinal as i32, &mut current, &mut peak) } == 0 {
            return Some((current as u64, peak as u64));
        }
    }
    let _ = ordinal;
    None
}

/// Restarts the peak of [`allocated_bytes`] at the current value; false where unavailable.
pub fn reset_peak_allocated(ordinal: usize) -> bool {
    #[cfg(dl_torch_cuda)]
    // SAFETY: resets the allocator's peak counters; errors come back as -1.
    let reset = unsafe { dl_cuda_reset_peak_bytes(ordinal as i32) } == 0;
    #[cfg(not(dl_torch_cuda))]
    let reset = {
        let _ = ordinal;
        false
    };
    reset
}

#[cfg(dl_cuda_kernels)]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use anyhow::{anyhow, bail, Context, Result};
    use cudarc::driver::{
        CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
    };
    use tch::{Device, Kind, Tensor};

    use crate::fused::{DlArgs, Pass, FLAG_ROW_SUM};
    use crate::Reduction;

    static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));
    const THREADS: u32 = 256;
    /// A fixed grid cap keeps the reduction order (and so the result) independent of the card.
    const MAX_BLOCKS: i64 = 1024;

    // SAFETY: DlArgs is #[repr(C)], plain data, and mirrors dl::Args.
    unsafe impl cudarc::driver::DeviceRepr for DlArgs {}

    struct Loaded {
        ctx: Arc<CudaContext>,
        module: Arc<CudaModule>,
        functions: Mutex<HashMap<String, CudaFunction>>,
    }

    #[cfg(dl_torch_cuda)]
    extern "C" {
        fn dl_current_cuda_stream(device: i32) -> *mut std::ffi::c_void;
        fn dl_cuda_warp_size() -> i32;
    }

    fn loaded(ordinal: usize) -> Result<Arc<Loaded>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Loaded>>>> = OnceLock::new();
        let mut map = DEVICES
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| anyhow!("poisoned lock"))?;
        if let Some(l) = map.get(&ordinal) {
            return Ok(l.clone());
        }
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("the CUDA driver library (libcuda.so) was not found");
        }
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("CUDA context for device {ordinal}"))?;
        #[cfg(dl_torch_cuda)]
        {
            // SAFETY: asks libtorch for the current device's warp size; -1 on error.
            let warp = unsafe { dl_cuda_warp_size() };
            if warp != 32 {
                bail!("the kernels need a warp of 32 threads; libtorch reports {warp}");
            }
        }
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec()))
            .context("loading the embedded CUDA kernels (they need sm_80 or newer)")?;
        let l = Arc::new(Loaded {
            ctx,
            module,
            functions: Mutex::new(HashMap::new()),
        });
        map.insert(ordinal, l.clone());
        Ok(l)
    }

    fn function(l: &Loaded, name: &str) -> Result<CudaFunction> {
        let mut f = l.functions.lock().map_err(|_| anyhow!("poisoned lock"))?;
        if let Some(func) = f.get(name) {
            return Ok(func.clone());
        }
        let func = l
            .module
            .load_function(name)
            .with_context(|| format!("kernel {name}"))?;
        f.insert(name.to_string(), func.clone());
        Ok(func)
    }

    fn stream(l: &Loaded, ordinal: usize) -> Arc<CudaStream> {
        #[cfg(dl_torch_cuda)]
        {
            // SAFETY: returns torch's current stream of this device (or null).
            let s = unsafe { dl_current_cuda_stream(ordinal as i32) };
            if !s.is_null() {
                // SAFETY: torch owns the stream and keeps it alive; work is ordered on it.
                return unsafe {
                    l.ctx
                        .wrap_borrowed_stream(s as cudarc::driver::sys::CUstream)
                };
            }
        }
        let _ = ordinal;
        l.ctx.default_stream()
    }

    fn suffix(kind: Kind) -> &'static str {
        match kind {
            Kind::Double => "f64",
            Kind::Half => "f16",
            Kind::BFloat16 => "bf16",
            _ => "f32",
        }
    }

    fn go(l: &Loaded, s: &Arc<CudaStream>, name: &str, blocks: u32, args: &DlArgs) -> Result<()> {
        let f = function(l, name)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(&f);
        b.arg(args);
        // SAFETY: the kernel reads and writes only the tensors that `args` describes, which the
        // caller keeps alive until the stream has run the work (tch's caching allocator orders
        // reuse on torch's current stream, the one we launch on).
        unsafe { b.launch(cfg) }.with_context(|| format!("launching {name}"))?;
        Ok(())
    }

    pub(crate) fn launch(
        body: &str,
        pass: Pass,
        kind: Kind,
        acc: Kind,
        ordinal: usize,
        args: &mut DlArgs,
    ) -> Result<()> {
        let l = loaded(ordinal)?;
        let s = stream(&l, ordinal);
        let total = args.n * args.c;
        let work = if args.flags & FLAG_ROW_SUM != 0
            && args.reduction == Reduction::None as i32
            && pass == Pass::Forward
        {
            args.n
        } else {
            total
        };
        let blocks = ((work + THREADS as i64 - 1) / THREADS as i64).clamp(1, MAX_BLOCKS) as u32;
        // 32-bit indices while the grid-stride index cannot wrap: the last index plus one stride.
        let wide = total + MAX_BLOCKS * THREADS as i64 >= (1i64 << 32);
        let pass_name = if pass == Pass::Forward {
            "forward"
        } else {
            "backward"
        };
        let name = format!(
            "dl_{body}_{pass_name}_{}_{}",
            suffix(kind),
            if wide { "k64" } else { "k" }
        );
        if pass == Pass::Forward && args.reduction != Reduction::None as i32 {
            let partials = Tensor::f_empty([blocks as i64], (acc, Device::Cuda(ordinal)))?;
            args.partials = partials.data_ptr() as u64;
            args.n_partials = blocks as i32;
            go(&l, &s, &name, blocks, args)?;
            go(&l, &s, &format!("dl_finalize_{}_k", suffix(kind)), 1, args)?;
            // `partials` goes back to the caching allocator, which records it for this stream.
            drop(partials);
        } else if total > 0 {
            go(&l, &s, &name, blocks, args)?;
        }
        Ok(())
    }
}
