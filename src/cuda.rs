//! CUDA plumbing: the embedded fatbin, loaded once per device through cudarc into the primary
//! context (the one libtorch uses), and the launch of a named kernel on torch's current stream.
//! What to launch (the plan) is decided in `launch.rs`; nothing here knows of losses.
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
pub(crate) fn run_kernel(_: usize, _: &str, _: u32, _: &crate::abi::DlArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "tch-detloss was built without CUDA kernels (nvcc was not found at build time): run \
         scripts/setup.sh, or set TCH_DETLOSS_NVCC or CUDA_HOME to a CUDA 13 nvcc, and rebuild"
    )
}

#[cfg(dl_cuda_kernels)]
pub(crate) use imp::run_kernel;

#[cfg(dl_torch_cuda)]
extern "C" {
    fn dl_cuda_memory_stats(device: i32, out: *mut i64) -> i32;
    fn dl_cuda_empty_cache() -> i32;
    fn dl_cuda_record_memory_history(enabled: i32) -> i32;
    fn dl_cuda_memory_snapshot(path: *const std::ffi::c_char) -> i32;
    fn dl_cuda_allocated_bytes(device: i32, current: *mut i64, peak: *mut i64) -> i32;
    fn dl_cuda_reset_peak_bytes(device: i32) -> i32;
    fn dl_cuda_set_sync_debug_mode(mode: i32) -> i32;
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

/// The CUDA caching allocator's counters of one device (all pools), in bytes where a size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in tensors now.
    pub allocated: u64,
    /// The most since the last [`reset_peak_allocated`].
    pub allocated_peak: u64,
    /// Bytes the allocator holds from the driver now.
    pub reserved: u64,
    /// The most reserved since the last reset.
    pub reserved_peak: u64,
    /// Bytes in blocks in use (allocated, or freed but awaiting their stream).
    pub active: u64,
    /// The most active since the last reset.
    pub active_peak: u64,
    /// Allocations that had to free the cache and retry.
    pub alloc_retries: u64,
    /// Out-of-memory errors raised.
    pub ooms: u64,
}

fn need_cuda(what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg!(dl_torch_cuda),
        "{what}: this build has no libtorch CUDA side (the CUDA headers were not found at build time)"
    );
    anyhow::ensure!(
        tch::Cuda::is_available(),
        "{what}: no CUDA device is available"
    );
    Ok(())
}

/// The allocator's counters of device `ordinal`. An error without CUDA.
pub fn memory_stats(ordinal: usize) -> anyhow::Result<MemoryStats> {
    need_cuda("memory_stats")?;
    let mut v = [0i64; 8];
    #[cfg(dl_torch_cuda)]
    // SAFETY: fills 8 counters; errors come back as -1.
    let rc = unsafe { dl_cuda_memory_stats(ordinal as i32, v.as_mut_ptr()) };
    #[cfg(not(dl_torch_cuda))]
    let rc = -1;
    anyhow::ensure!(
        rc == 0,
        "memory_stats: cannot read the allocator of cuda:{ordinal}"
    );
    let u = |i: usize| v[i].max(0) as u64;
    Ok(MemoryStats {
        allocated: u(0),
        allocated_peak: u(1),
        reserved: u(2),
        reserved_peak: u(3),
        active: u(4),
        active_peak: u(5),
        alloc_retries: u(6),
        ooms: u(7),
    })
}

/// Returns the allocator's cached, unused memory to the driver (`torch.cuda.empty_cache()`).
pub fn empty_cache() -> anyhow::Result<()> {
    need_cuda("empty_cache")?;
    #[cfg(dl_torch_cuda)]
    // SAFETY: no arguments; errors come back as -1.
    anyhow::ensure!(unsafe { dl_cuda_empty_cache() } == 0, "empty_cache failed");
    Ok(())
}

/// Starts or stops recording the allocator's history (every allocation and free, with C++
/// stacks), for [`memory_snapshot`].
pub fn record_memory_history(enabled: bool) -> anyhow::Result<()> {
    need_cuda("record_memory_history")?;
    #[cfg(dl_torch_cuda)]
    // SAFETY: sets the allocator's recording; errors come back as -1.
    anyhow::ensure!(
        unsafe { dl_cuda_record_memory_history(i32::from(enabled)) } == 0,
        "record_memory_history failed"
    );
    Ok(())
}

/// Writes the allocator's snapshot, with the recorded history, to `path`: the pickle that
/// PyTorch's memory viewer (pytorch.org/memory_viz) opens.
pub fn memory_snapshot(path: &std::path::Path) -> anyhow::Result<()> {
    need_cuda("memory_snapshot")?;
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes())?;
    #[cfg(dl_torch_cuda)]
    // SAFETY: the path outlives the call; errors come back as -1.
    anyhow::ensure!(
        unsafe { dl_cuda_memory_snapshot(c.as_ptr()) } == 0,
        "memory_snapshot: cannot write {}",
        path.display()
    );
    let _ = c;
    Ok(())
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

    use crate::abi::DlArgs;

    static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

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

    /// Launches kernel `name` of the embedded fatbin with `blocks` blocks of
    /// [`THREADS`](crate::launch::THREADS) threads on torch's current stream of device `ordinal`.
    pub(crate) fn run_kernel(ordinal: usize, name: &str, blocks: u32, args: &DlArgs) -> Result<()> {
        let l = loaded(ordinal)?;
        let s = stream(&l, ordinal);
        let f = function(&l, name)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (crate::launch::THREADS, 1, 1),
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
}

/// c10's CUDA sync-debug mode: what libtorch does when an operation makes the host wait for the
/// device (`.item()`, `nonzero`, a copy to the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncDebugMode {
    /// Nothing (the default).
    Disabled = 0,
    /// A warning per synchronizing operation.
    Warn = 1,
    /// The operation fails with an error.
    Error = 2,
}

/// Restores the previous sync-debug mode when dropped; see [`sync_debug`].
#[derive(Debug)]
pub struct SyncDebugGuard {
    previous: i32,
}

impl Drop for SyncDebugGuard {
    fn drop(&mut self) {
        #[cfg(dl_torch_cuda)]
        // SAFETY: sets a process-wide flag of c10; no pointers.
        unsafe {
            dl_cuda_set_sync_debug_mode(self.previous);
        }
    }
}

/// Sets c10's CUDA sync-debug mode until the guard is dropped (the mode is process-wide, as in
/// PyTorch's `torch.cuda.set_sync_debug_mode`). An error on a build without libtorch's CUDA side
/// or a machine without a CUDA device.
///
/// ```no_run
/// use tch_detloss::cuda::{sync_debug, SyncDebugMode};
/// let _guard = sync_debug(SyncDebugMode::Error)?;
/// // ... a training step: any host synchronization in it now fails
/// # anyhow::Ok(())
/// ```
pub fn sync_debug(mode: SyncDebugMode) -> anyhow::Result<SyncDebugGuard> {
    #[cfg(dl_torch_cuda)]
    {
        anyhow::ensure!(
            tch::Cuda::is_available(),
            "sync-debug mode {mode:?}: no CUDA device is available (the mode only watches CUDA)"
        );
        // SAFETY: sets a process-wide flag of c10; no pointers.
        let previous = unsafe { dl_cuda_set_sync_debug_mode(mode as i32) };
        anyhow::ensure!(previous >= 0, "c10 refused the sync-debug mode {mode:?}");
        Ok(SyncDebugGuard { previous })
    }
    #[cfg(not(dl_torch_cuda))]
    {
        anyhow::bail!(
            "sync-debug mode {mode:?}: this build has no libtorch CUDA side (the CUDA headers were \
             not found at build time)"
        )
    }
}
