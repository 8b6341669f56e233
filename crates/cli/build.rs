// The binary links libtorch through rankstab-train: give it an rpath to the libtorch tch
// was built against, so it runs with no LD_LIBRARY_PATH (see ENVIRONMENT.md).
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
