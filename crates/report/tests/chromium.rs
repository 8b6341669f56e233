//! Opens a full report in headless Chromium and checks that it renders: a non-blank
//! screenshot, every figure parsed as inline SVG (counted by the page's own check script
//! into attributes of `<html>`), and no script, resource or console error; and that the
//! example report's first screen (1400 x 900) holds the verdict card and the headline
//! figure (their positions, from the same script), with a screenshot of it left in
//! `target/tmp/example-first-screen.png`.
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

/// Chromium, or `None` after saying why the test skips (a failure under
/// `RANKSTAB_REQUIRE_CHROMIUM=1`).
fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    let bin = chromium();
    if bin.is_none() {
        if std::env::var("RANKSTAB_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("chromium not found (RANKSTAB_REQUIRE_CHROMIUM=1): apt-get install chromium");
        }
        eprintln!("SKIPPED {test}: no chromium on PATH (apt-get install chromium; set RANKSTAB_REQUIRE_CHROMIUM=1 to make this a failure)");
    }
    bin
}

fn num_attr(dom: &str, name: &str, stderr: &str) -> i64 {
    attr(dom, name)
        .unwrap_or_else(|| {
            panic!("{name} missing: the page's check script did not run; stderr: {stderr}")
        })
        .parse()
        .expect("number")
}

#[test]
fn the_example_report_s_first_screen_holds_the_verdict_and_the_headline_figure() {
    let Some(bin) = chromium_or_skip(
        "the_example_report_s_first_screen_holds_the_verdict_and_the_headline_figure",
    ) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../reports/example/runs");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("example-report");
    let _ = std::fs::remove_dir_all(&out);
    let opts = ReportOptions {
        title: "rankstab example report (small theory run and a small training sweep)".into(),
        generated: Some("2024-01-01T00:00:00Z".into()),
        ..ReportOptions::default()
    };
    let outcome = build_report(
        &[root.join("theory-small"), root.join("sweep-small")],
        &out,
        &opts,
    )
    .expect("the example report");
    let url = format!(
        "file://{}",
        outcome.index_html.canonicalize().expect("path").display()
    );
    let o = run_chromium(
        &bin,
        &tmp.path().join("profile-dom"),
        &[
            "--window-size=1400,900".into(),
            "--virtual-time-budget=10000".into(),
            "--dump-dom".into(),
            url.clone(),
        ],
        Duration::from_secs(180),
    );
    let dom = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "chromium --dump-dom failed: {stderr}");
    let v_top = num_attr(&dom, "data-verdict-top", &stderr);
    let v_bottom = num_attr(&dom, "data-verdict-bottom", &stderr);
    let f_top = num_attr(&dom, "data-headline-top", &stderr);
    let f_bottom = num_attr(&dom, "data-headline-bottom", &stderr);
    let f_height = num_attr(&dom, "data-headline-height", &stderr);
    eprintln!("verdict card {v_top}..{v_bottom} px, headline figure {f_top}..{f_bottom} px");
    assert!(
        v_top >= 0 && v_bottom <= 900,
        "verdict card at {v_top}..{v_bottom} px: not within the first 900 px"
    );
    assert!(f_height > 150, "headline figure only {f_height} px tall");
    assert!(
        f_bottom <= 900,
        "headline figure ends at {f_bottom} px: not within the first 900 px"
    );
    assert_eq!(num_attr(&dom, "data-errors", &stderr), 0);

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("example-first-screen.png");
    let _ = std::fs::remove_file(&shot);
    let o = run_chromium(
        &bin,
        &tmp.path().join("profile-shot"),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,900".into(),
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
    let reader = png::Decoder::new(bytes.as_slice())
        .read_info()
        .expect("PNG");
    assert_eq!((reader.info().width, reader.info().height), (1400, 900));
    eprintln!("first screen: {}", shot.display());
}

#[test]
fn report_renders_in_headless_chromium() {
    let Some(bin) = chromium_or_skip("report_renders_in_headless_chromium") else {
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
    assert_eq!(
        total, outcome.figures,
        "every figure is an inline SVG figure"
    );
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
