//! The README shows the dependent crate (`dependent/`, which `make test` builds and runs) as it
//! is: its program and its build script appear in the README verbatim.

fn read(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn readme_shows_the_dependent_crate_verbatim() {
    let readme = read("README.md");
    for file in ["dependent/src/main.rs", "dependent/build.rs"] {
        let block = format!("```rust\n{}```", read(file));
        assert!(
            readme.contains(&block),
            "README.md does not show {file} as it is"
        );
    }
    let manifest = read("dependent/Cargo.toml");
    for dep in ["tch = \"=0.24.0\"", "tch-detloss = { path = \"..\" }"] {
        assert!(manifest.contains(dep), "dependent/Cargo.toml lacks {dep}");
        assert!(readme.contains(dep), "README.md lacks {dep}");
    }
}
