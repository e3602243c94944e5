//! Reads `ptxas -v` output: per entry point and architecture, its registers and spill bytes.
//! Shared by build.rs (which fails the build on spills) and the crate (which reports them).

/// One kernel entry point as ptxas compiled it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelReport {
    /// The entry point.
    pub name: String,
    /// The target, e.g. `sm_90`.
    pub arch: String,
    /// Registers per thread.
    pub registers: u32,
    /// Spill stores plus spill loads, in bytes.
    pub spill_bytes: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// Parses the log; entries appear in the order ptxas compiled them.
pub fn parse(log: &str) -> Vec<KernelReport> {
    let mut out: Vec<KernelReport> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            let arch = rest
                .split("for '")
                .nth(1)
                .unwrap_or_default()
                .trim_end_matches('\'')
                .to_string();
            out.push(KernelReport {
                name,
                arch,
                registers: 0,
                spill_bytes: 0,
            });
        } else if let Some(last) = out.last_mut() {
            if line.contains("bytes spill stores") {
                last.spill_bytes = number_before(line, "bytes spill stores").unwrap_or(0)
                    + number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") && last.registers == 0 {
                last.registers = number_before(line, " registers").unwrap_or(0);
            }
        }
    }
    out
}
