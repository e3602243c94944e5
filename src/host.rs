//! The CPU executor (kernels/executor_host.h), built per loss for x86-64-v3 (AVX2 + FMA, vector
//! math) and for the baseline ISA; the best one this CPU runs is chosen once.

use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

use anyhow::{bail, Result};

use crate::abi::DlArgs;
use crate::bodies::{Body, HostRun, HOST_BASE};

/// Which CPU build runs: `"x86-64-v3"` or `"baseline"`.
pub fn cpu_isa() -> &'static str {
    select().0
}

fn select() -> (&'static str, &'static [HostRun]) {
    static CHOICE: OnceLock<(&'static str, &'static [HostRun])> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        #[cfg(dl_host_v3)]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("bmi2")
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("movbe")
            {
                return ("x86-64-v3", &crate::bodies::HOST_V3[..]);
            }
        }
        ("baseline", &HOST_BASE[..])
    })
}

/// Runs one pass on the CPU; returns the number of rows whose label was out of range.
pub(crate) fn run(body: Body, pass: i32, dtype: i32, args: &DlArgs) -> Result<i64> {
    let mut err = [0 as c_char; 1024];
    // SAFETY: args points at live CPU tensors of the sizes it states (checked by fused::prepare).
    let r = unsafe { (select().1[body as usize])(pass, dtype, args, err.as_mut_ptr(), err.len()) };
    if r < 0 {
        // SAFETY: NUL-terminated by the C++ side.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        bail!("{msg}");
    }
    Ok(r)
}
