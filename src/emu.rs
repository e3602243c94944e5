//! The emulated CUDA device: `kernels/kernels.cu`, compiled by the host compiler with
//! `kernels/emu/` (every CUDA thread a fiber, `__syncthreads` a block barrier, warp shuffles an
//! exchange between warp barriers), so that every test run executes the device executor and
//! the launch plan that a GPU runs. Test-only: the switch lives in [`crate::testing`].

use std::cell::Cell;

use anyhow::Result;

use crate::abi::DlArgs;
use crate::launch::Geometry;

/// How the emulated device runs a launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmulatedDevice {
    /// Run the threads of each block in reverse order (a missing barrier then shows up as a
    /// different result).
    pub reverse: bool,
    /// Cap the grid at this many blocks (so that every thread strides many times); `None`: the
    /// GPU's cap.
    pub max_blocks: Option<i64>,
    /// Take the 64-bit-index entry points even where 32 bits would do.
    pub wide: bool,
}

impl EmulatedDevice {
    pub(crate) fn geometry(self) -> Geometry {
        let d = Geometry::default();
        Geometry {
            max_blocks: self.max_blocks.unwrap_or(d.max_blocks),
            force_wide: self.wide,
        }
    }
}

thread_local! {
    static CURRENT: Cell<Option<EmulatedDevice>> = const { Cell::new(None) };
}

/// Runs `f` with CPU tensors sent down the CUDA path on the emulated device: no gradient written
/// in forward, backward recomputing, the device executor and the launch plan of a GPU. The
/// choice is made at forward time and kept by the autograd node for its backward.
pub fn with_emulated_device<R>(device: EmulatedDevice, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<EmulatedDevice>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(Some(device))));
    f()
}

/// The emulated device this thread sends CPU tensors to, if any.
pub(crate) fn current() -> Option<EmulatedDevice> {
    CURRENT.with(Cell::get)
}

/// Whether this build has the emulated device (the CUDA headers were found at build time).
pub fn built() -> bool {
    cfg!(dl_emu)
}

#[cfg(dl_emu)]
mod imp {
    use std::ffi::{c_char, CStr, CString};

    use anyhow::{anyhow, bail, Result};

    use crate::abi::DlArgs;

    extern "C" {
        fn dl_emu_launch(
            name: *const c_char,
            grid: u32,
            block: u32,
            args: *const std::ffi::c_void,
            args_size: usize,
            flags: i32,
            err: *mut c_char,
            errlen: usize,
        ) -> i32;
        fn dl_emu_kernel_count() -> usize;
        fn dl_emu_kernel_name(i: usize) -> *const c_char;
    }

    pub(crate) fn run_kernel(name: &str, blocks: u32, args: &DlArgs, reverse: bool) -> Result<()> {
        let c_name = CString::new(name).map_err(|_| anyhow!("kernel name {name:?}"))?;
        let mut err = [0 as c_char; 1024];
        // SAFETY: `args` points at live CPU tensors of the sizes it states; the emulator copies
        // the argument block and writes a NUL-terminated message into `err` on failure.
        let rc = unsafe {
            dl_emu_launch(
                c_name.as_ptr(),
                blocks,
                crate::launch::THREADS,
                args as *const DlArgs as *const std::ffi::c_void,
                std::mem::size_of::<DlArgs>(),
                i32::from(reverse),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: NUL-terminated by the C++ side.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            bail!("emulated launch of {name} ({blocks} blocks): {msg}");
        }
        Ok(())
    }

    pub(crate) fn kernel_names() -> Vec<String> {
        // SAFETY: the registry is filled by static initializers and never changes afterwards;
        // each name is a NUL-terminated static string.
        (0..unsafe { dl_emu_kernel_count() })
            .map(|i| {
                unsafe { CStr::from_ptr(dl_emu_kernel_name(i)) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

/// Runs kernel `name` of the emulated device with `blocks` blocks.
pub(crate) fn run_kernel(name: &str, blocks: u32, args: &DlArgs, reverse: bool) -> Result<()> {
    #[cfg(dl_emu)]
    return imp::run_kernel(name, blocks, args, reverse);
    #[cfg(not(dl_emu))]
    {
        let _ = (name, blocks, args, reverse);
        anyhow::bail!(
            "this build has no emulated CUDA device (the CUDA headers were not found at build \
             time): run scripts/setup.sh and rebuild"
        )
    }
}

/// The entry points the emulated device has; empty without it.
pub fn kernel_names() -> Vec<String> {
    #[cfg(dl_emu)]
    return imp::kernel_names();
    #[cfg(not(dl_emu))]
    Vec::new()
}
