// torch-sys embeds no rpath: give every binary and test of this crate one to the libtorch
// that tch was built against, so they run with no LD_LIBRARY_PATH (ENVIRONMENT.md).
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
