//! Builds the native parts of tch-detloss:
//! - the CPU executor (kernels/host.cpp) for the baseline ISA and, on x86-64, for x86-64-v3 with
//!   glibc's vector math;
//! - the autograd bridge (kernels/autograd.cpp) and, when the CUDA headers are at hand, the shim
//!   that reaches libtorch's CUDA side: current stream, allocator counters (kernels/torch_cuda.cpp);
//! - the CUDA kernels (kernels/kernels.cu), compiled by nvcc into one fatbin (sm_80, sm_90 and
//!   compute_90 PTX) that the crate embeds. A build without nvcc still works, for the CPU.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/ptxas.rs"]
#[allow(dead_code)]
mod ptxas;

const KERNEL_HEADERS: &[&str] = &[
    "kernels/common.cuh",
    "kernels/dispatch.cuh",
    "kernels/focal.cuh",
    "kernels/quality_focal.cuh",
    "kernels/varifocal.cuh",
    "kernels/executor_host.h",
];

fn main() {
    println!("cargo:rustc-check-cfg=cfg(dl_cuda_kernels)");
    println!("cargo:rustc-check-cfg=cfg(dl_host_v3)");
    println!("cargo:rustc-check-cfg=cfg(dl_torch_cuda)");
    for f in KERNEL_HEADERS.iter().chain(&[
        "kernels/host.cpp",
        "kernels/autograd.cpp",
        "kernels/torch_cuda.cpp",
        "kernels/kernels.cu",
    ]) {
        println!("cargo:rerun-if-changed={f}");
    }
    for v in [
        "TCH_DETLOSS_NVCC",
        "NVCC",
        "CUDA_HOME",
        "TCH_DETLOSS_NO_CUDA",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    // torch-sys (links = "tch") tells its dependents where libtorch is.
    let lib_dir = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("DEP_TCH_LIBTORCH_LIB is unset: torch-sys must be a direct dependency"),
    );
    let torch_root = lib_dir
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let includes = [
        torch_root.join("include"),
        torch_root.join("include/torch/csrc/api/include"),
    ];
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();

    let cxx = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .includes(&includes)
            .flag_if_supported("-Wno-deprecated-declarations")
            .warnings(false);
        b
    };

    // The CPU executor. -fno-math-errno/-fno-trapping-math let GCC vectorize the math calls
    // without changing a single result (no fast-math).
    let host = |isa: &str, extra: &[&str]| {
        let mut b = cxx();
        b.file("kernels/host.cpp")
            .out_dir(PathBuf::from(env::var("OUT_DIR").unwrap()).join(format!("host_{isa}")))
            .opt_level(3)
            .define("DL_ISA", isa)
            .flag("-fopenmp")
            .flag("-fno-math-errno")
            .flag("-fno-trapping-math");
        for f in extra {
            b.flag(f);
        }
        b.compile(&format!("dl_host_{isa}"));
    };

    let nvcc = if env::var_os("TCH_DETLOSS_NO_CUDA").is_some() {
        None
    } else {
        find_nvcc(&torch_root)
    };
    let cuda_include = nvcc
        .as_ref()
        .and_then(|n| n.parent()?.parent().map(|p| p.join("include")))
        .filter(|inc| {
            inc.join("cuda_runtime_api.h").exists() && lib_dir.join("libc10_cuda.so").exists()
        });

    // The compilations are independent: run them side by side.
    std::thread::scope(|s| {
        s.spawn(|| host("base", &[]));
        if target_arch == "x86_64" {
            s.spawn(|| host("v3", &["-march=x86-64-v3", "-DDL_SIMD_MATH"]));
        }
        s.spawn(|| {
            cxx()
                .file("kernels/autograd.cpp")
                .opt_level(2)
                .compile("dl_autograd")
        });
        if let Some(inc) = &cuda_include {
            s.spawn(move || {
                cxx()
                    .file("kernels/torch_cuda.cpp")
                    .include(inc)
                    .opt_level(2)
                    .compile("dl_torch_cuda")
            });
        }
        if let Some(nvcc) = &nvcc {
            s.spawn(move || build_fatbin(nvcc));
        }
    });
    if target_arch == "x86_64" {
        println!("cargo:rustc-cfg=dl_host_v3");
        println!("cargo:rustc-link-lib=mvec");
    }
    if cuda_include.is_some() {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-cfg=dl_torch_cuda");
    }
    match &nvcc {
        Some(_) => println!("cargo:rustc-cfg=dl_cuda_kernels"),
        None => println!(
            "cargo:warning=nvcc not found (set TCH_DETLOSS_NVCC or CUDA_HOME, or run scripts/setup.sh): \
             tch-detloss is built for the CPU only"
        ),
    }

    // Our own binaries (tests, examples, benches) must keep libtorch_cuda even though no symbol
    // of it is referenced, or CUDA tensors fail at run time (tch-rs #907, #980); and they run
    // without LD_LIBRARY_PATH thanks to the rpath. Users' binaries need the same two (README).
    for kind in ["tests", "examples", "benches"] {
        println!("cargo:rustc-link-arg-{kind}=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-{kind}=-ltorch");
        println!(
            "cargo:rustc-link-arg-{kind}=-Wl,-rpath,{}",
            lib_dir.display()
        );
    }
}

/// nvcc from TCH_DETLOSS_NVCC, NVCC, CUDA_HOME, the torch environment's nvidia/cu13 wheels, or PATH.
fn find_nvcc(torch_root: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for v in ["TCH_DETLOSS_NVCC", "NVCC"] {
        if let Some(p) = env::var_os(v) {
            candidates.push(p.into());
        }
    }
    if let Some(h) = env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(h).join("bin/nvcc"));
    }
    if let Some(site) = torch_root.parent() {
        candidates.push(site.join("nvidia/cu13/bin/nvcc"));
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn build_fatbin(nvcc: &Path) {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("kernels.fatbin");
    let output = Command::new(nvcc)
        .args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v"])
        .args(["-gencode", "arch=compute_80,code=sm_80"])
        .args(["-gencode", "arch=compute_90,code=sm_90"])
        .args(["-gencode", "arch=compute_90,code=compute_90"])
        .arg("-o")
        .arg(&out)
        .arg("kernels/kernels.cu")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    let log = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        panic!("nvcc failed on kernels/kernels.cu:\n{log}");
    }
    let spills: Vec<String> = ptxas::parse(&log)
        .into_iter()
        .filter(|k| k.spill_bytes > 0)
        .map(|k| format!("{} ({}): {} bytes", k.name, k.arch, k.spill_bytes))
        .collect();
    if !spills.is_empty() {
        panic!(
            "register spills in the CUDA kernels:\n{}",
            spills.join("\n")
        );
    }
    fs::write(
        PathBuf::from(env::var("OUT_DIR").unwrap()).join("ptxas.log"),
        log.as_bytes(),
    )
    .expect("write ptxas.log");
}
