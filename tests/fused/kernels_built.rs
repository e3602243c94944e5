//! The CUDA kernels as nvcc built them.

/// The kernels were compiled by nvcc into the embedded fatbin (the set-up installs nvcc), with
/// every entry point present for sm_80 and sm_90 and no register spills.
#[test]
fn cuda_kernels_compiled_without_spills() {
    if std::env::var_os("TCH_DETLOSS_NO_CUDA").is_some() {
        assert!(!tch_detloss::cuda::kernels_built());
        return;
    }
    assert!(
        tch_detloss::cuda::kernels_built(),
        "nvcc was not found at build time: run scripts/setup.sh"
    );
    let report = tch_detloss::cuda::ptxas_report();
    let planned = tch_detloss::testing::planned_kernel_names();
    assert!(
        planned.len() >= 3 * 2 * 4 * 2 + 4,
        "only {} planned",
        planned.len()
    );
    for arch in ["sm_80", "sm_90"] {
        for name in &planned {
            assert!(
                report.iter().any(|e| &e.name == name && e.arch == arch),
                "{name}, which the launch plan can form, is missing from the fatbin for {arch}"
            );
        }
    }
    let spilling: Vec<_> = report.iter().filter(|e| e.spill_bytes > 0).collect();
    assert!(spilling.is_empty(), "spills: {spilling:?}");
}
