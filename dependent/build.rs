// Lets the binary find libtorch at run time without LD_LIBRARY_PATH.
fn main() {
    let lib = std::env::var("DEP_TCH_DETLOSS_LIBTORCH_LIB").unwrap();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
