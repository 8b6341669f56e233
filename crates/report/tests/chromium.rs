//! Opens a full report in headless Chromium and checks that it renders: a non-blank
//! screenshot, every figure decoded (`naturalWidth > 0`, counted by the page's own check
//! script into attributes of `<html>`), and no script, resource or console error.
//!
//! Skips with a message when Chromium is absent, unless `RANKSTAB_REQUIRE_CHROMIUM=1`
//! (then it fails). Debian: `apt-get install chromium`.
mod common;

use rankstab_report::{build_report, ReportOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("RANKSTAB_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Runs Chromium headless with a fresh profile, killed after `limit`. Output goes to files
/// (the dumped DOM holds the inline figures: megabytes, more than a pipe buffers).
fn run_chromium(bin: &Path, profile: &Path, args: &[String], limit: Duration) -> Output {
    let out_path = profile.with_extension("stdout");
    let err_path = profile.with_extension("stderr");
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("chromium starts");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("chromium did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

fn attr(dom: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let i = dom.find(&key)? + key.len();
    Some(dom[i..].split('"').next()?.to_string())
}

#[test]
fn report_renders_in_headless_chromium() {
    let Some(bin) = chromium() else {
        if std::env::var("RANKSTAB_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("chromium not found (RANKSTAB_REQUIRE_CHROMIUM=1): apt-get install chromium");
        }
        eprintln!("SKIPPED report_renders_in_headless_chromium: no chromium on PATH (apt-get install chromium; set RANKSTAB_REQUIRE_CHROMIUM=1 to make this a failure)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let theory = common::write_theory_run(tmp.path(), vec![2]);
    let sweep = tmp.path().join("sweep");
    common::write_train_sweep(&sweep);
    let out = tmp.path().join("report");
    let outcome = build_report(&[theory, sweep], &out, &ReportOptions::default()).expect("report");
    let url = format!(
        "file://{}",
        outcome.index_html.canonicalize().expect("path").display()
    );

    // 1. The DOM after load: the page's check script counts decoded figures and errors.
    let o = run_chromium(
        &bin,
        &tmp.path().join("profile-dom"),
        &[
            "--virtual-time-budget=10000".into(),
            "--dump-dom".into(),
            url.clone(),
        ],
        Duration::from_secs(180),
    );
    let dom = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "chromium --dump-dom failed: {stderr}");
    let total: usize = attr(&dom, "data-figures-total")
        .unwrap_or_else(|| panic!("the page's check script did not run; stderr: {stderr}"))
        .parse()
        .expect("number");
    let loaded: usize = attr(&dom, "data-figures-loaded")
        .expect("attribute")
        .parse()
        .expect("number");
    let errors: usize = attr(&dom, "data-errors")
        .expect("attribute")
        .parse()
        .expect("number");
    assert_eq!(total, outcome.figures, "every figure is an <img>");
    assert_eq!(loaded, total, "only {loaded} of {total} figures decoded");
    assert_eq!(errors, 0, "{errors} script or resource errors");
    // Console messages are logged as ...:CONSOLE(line)] "text"; the page logs none.
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");

    // 2. A screenshot of the top of the page is not blank.
    let shot = tmp.path().join("shot.png");
    let o = run_chromium(
        &bin,
        &tmp.path().join("profile-shot"),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,2000".into(),
            "--virtual-time-budget=10000".into(),
            url,
        ],
        Duration::from_secs(180),
    );
    assert!(
        o.status.success() && shot.is_file(),
        "screenshot failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let bytes = std::fs::read(&shot).expect("screenshot");
    let mut reader = png::Decoder::new(bytes.as_slice())
        .read_info()
        .expect("PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("frame");
    let px = info.color_type.samples();
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    let non_white = pixels
        .iter()
        .filter(|p| p[..3].iter().any(|&c| c < 235))
        .count();
    let distinct: std::collections::BTreeSet<[u8; 3]> = pixels
        .iter()
        .map(|p| [p[0] & 0xF0, p[1] & 0xF0, p[2] & 0xF0])
        .collect();
    assert_eq!((info.width, info.height), (1200, 2000));
    assert!(
        non_white * 50 > pixels.len(),
        "screenshot nearly blank: {non_white} of {} pixels drawn",
        pixels.len()
    );
    assert!(
        distinct.len() > 20,
        "screenshot has only {} colours",
        distinct.len()
    );
}
