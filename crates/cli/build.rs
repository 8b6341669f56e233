// The binary links libtorch through rankstab-train: give it an rpath to the libtorch tch
// was built against, so it runs with no LD_LIBRARY_PATH (see ENVIRONMENT.md).
//
// It also bakes in the git revision of the sources it is built from (RANKSTAB_GIT_REVISION:
// the commit, with "-modified" when tracked files differ from it; "unknown" outside a git
// checkout), so that a run records the binary's revision, not that of the directory it
// runs in.
use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let crate_dir = Path::new(&manifest);
    let revision = match git(crate_dir, &["rev-parse", "HEAD"]) {
        Some(head) => {
            // Rebuilt when HEAD moves, a commit or checkout changes the index, or a source
            // changes (then "-modified" is decided again).
            for what in ["HEAD", "index"] {
                if let Some(p) = git(crate_dir, &["rev-parse", "--git-path", what]) {
                    let p = crate_dir.join(p);
                    println!("cargo:rerun-if-changed={}", p.display());
                }
            }
            if let Some(r) = git(crate_dir, &["symbolic-ref", "-q", "HEAD"]) {
                if let Some(p) = git(crate_dir, &["rev-parse", "--git-path", &r]) {
                    println!("cargo:rerun-if-changed={}", crate_dir.join(p).display());
                }
            }
            let root = crate_dir.join("../..");
            for d in ["crates", "Cargo.toml", "Cargo.lock"] {
                println!("cargo:rerun-if-changed={}", root.join(d).display());
            }
            let modified = git(
                crate_dir,
                &[
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                    "--",
                    "../..",
                ],
            )
            .is_some_and(|s| !s.is_empty());
            if modified {
                format!("{head}-modified")
            } else {
                head
            }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=RANKSTAB_GIT_REVISION={revision}");
}
