//! A whole report from a small theory run and a synthetic training sweep: files, numbers
//! recovered from the training fixture, figures, escaping.
mod common;

use rankstab_report::{build_report, ReportOptions};
use std::path::{Path, PathBuf};

fn theory_run(dir: &Path) -> PathBuf {
    common::write_theory_run(dir, vec![1, 2])
}

fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let mut rdr = csv::Reader::from_path(path).expect("exponents.csv");
    rdr.deserialize().map(|r| r.expect("row")).collect()
}

#[test]
fn theory_and_training_runs_make_a_full_report() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let theory = theory_run(tmp.path());
    let sweep = tmp.path().join("sweep");
    common::write_train_sweep(&sweep);
    let bad = tmp.path().join("bad<b>dir");
    std::fs::create_dir_all(&bad).expect("mkdir");
    let out = tmp.path().join("report");
    let opts = ReportOptions {
        proofs_dir: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proofs")),
        generated: Some("2024-01-01T00:00:00Z".into()),
        ..ReportOptions::default()
    };
    let outcome = build_report(&[theory.clone(), sweep.clone(), bad], &out, &opts).expect("report");
    assert_eq!(outcome.used.len(), 1 + 16, "{:?}", outcome.used);
    assert_eq!(outcome.skipped.len(), 1);
    assert!(
        outcome.skipped[0].reason.contains("manifest.json"),
        "{:?}",
        outcome.skipped
    );

    // Files and figures.
    let html = std::fs::read_to_string(&outcome.index_html).expect("index.html");
    let md = std::fs::read_to_string(&outcome.report_md).expect("report.md");
    let figs: Vec<PathBuf> = std::fs::read_dir(out.join("figures"))
        .expect("figures/")
        .map(|e| e.expect("entry").path())
        .collect();
    let pngs: Vec<&PathBuf> = figs
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    let svgs: Vec<&PathBuf> = figs
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .collect();
    assert_eq!(pngs.len(), outcome.figures);
    assert_eq!(svgs.len(), outcome.figures);
    assert!(
        outcome.figures >= 8 + 2 + 4 + 4,
        "{} figures",
        outcome.figures
    );
    for p in &pngs {
        let bytes = std::fs::read(p).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
        assert!(
            md.contains(&format!(
                "figures/{}",
                p.file_name().and_then(|n| n.to_str()).expect("name")
            )),
            "report.md lacks {}",
            p.display()
        );
    }
    for p in &svgs {
        let text = std::fs::read_to_string(p).expect("svg");
        roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    assert_eq!(
        html.matches("<img src=\"data:image&#x2f;png;base64,")
            .count()
            + html.matches("<img src=\"data:image/png;base64,").count(),
        outcome.figures
    );
    for needle in [
        "How to read this report",
        "The paper's findings next to ours",
        "Theory run theory",
        "Training runs",
        "Provenance",
        "finite-rank.md",
        "0123456789abcdef",
    ] {
        assert!(html.contains(needle), "index.html lacks {needle:?}");
    }
    // (minijinja escapes '/' as &#x2f; inside attributes; browsers decode it.)
    let unescaped = html.replace("&#x2f;", "/");
    assert!(
        unescaped.contains("href=\"../"),
        "proofs links should be relative"
    );
    assert!(
        unescaped.contains("/proofs/finite-rank.md\""),
        "no link to proofs/finite-rank.md"
    );
    // Escaping: the unusable directory's name is shown, escaped.
    assert!(!html.contains("bad<b>dir"), "unescaped text in index.html");
    assert!(html.contains("bad&lt;b&gt;dir"));
    assert!(
        md.contains("bad&lt;b&gt;dir"),
        "unescaped text in report.md"
    );

    // Numbers: the fixture's exponents are recovered, pooled over layers, for every module.
    let rows = csv_rows(&outcome.exponents_csv);
    let train: Vec<_> = rows
        .iter()
        .filter(|r| r["source"] == "train" && r["layer"] == "all" && r["window"] != "step 0")
        .collect();
    assert!(!train.is_empty());
    let mut checked = 0;
    for r in &train {
        let beta: f64 = r["beta"].parse().expect("beta");
        let slope: f64 = r["slope"].parse().expect("slope");
        let want = common::expected(&r["site"], &r["stat"], beta);
        if r["site"] == "grad_out" {
            assert!(slope.abs() < 0.05, "{r:?}");
            assert_eq!(r["predicted"], "", "grad_out has no law: {r:?}");
            continue;
        }
        assert!(
            (slope - want).abs() < 0.05,
            "slope {slope} vs {want}: {r:?}"
        );
        if r["stat"] == "abs" || r["stat"].starts_with("grad_norm") {
            let pred: f64 = r["predicted"]
                .parse()
                .unwrap_or_else(|_| panic!("no prediction: {r:?}"));
            assert!(
                (pred - want).abs() < 0.1,
                "predicted {pred} vs {want}: {r:?}"
            );
            assert_eq!(r["agrees"], "true", "{r:?}");
            if r["site"] == "fwd" {
                // The paper's law, whatever else is given; the theory run only adds MC columns.
                assert!(r["law"].contains("paper's law"), "{r:?}");
                assert_eq!(r["in_band"], "true", "{r:?}");
            }
            assert_eq!(r["seeds"], "2");
            // The Monte Carlo slope of the matching setting comes from the theory run.
            assert!(!r["mc_coherent"].is_empty(), "no MC slope: {r:?}");
        }
        checked += 1;
    }
    assert!(checked >= 24, "{checked}");
    // Per-layer rows too.
    assert!(rows
        .iter()
        .any(|r| r["source"] == "train" && r["layer"] == "1" && r["module"] == "down_proj"));
    // Theory rows as in fits.json.
    let fits: Vec<rankstab_records::Fit> =
        rankstab_records::read_json(&theory.join("fits.json")).expect("fits");
    assert_eq!(
        rows.iter().filter(|r| r["source"] == "theory").count(),
        fits.len()
    );

    // The paper's gradient-norm finding: LoRA's falls as r^-1/2 here, rsLoRA's is flat.
    assert!(
        html.contains("exponent -0.50"),
        "LoRA grad-norm exponent missing"
    );
    assert!(
        html.contains("exponent +0.00") || html.contains("exponent -0.00"),
        "rsLoRA grad-norm exponent missing"
    );
    assert!(html.contains("shape only"));
}

#[test]
fn training_runs_alone_use_the_coherent_limit_and_agree() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sweep = tmp.path().join("sweep");
    common::write_train_sweep(&sweep);
    let out = tmp.path().join("r");
    let outcome = build_report(&[sweep], &out, &ReportOptions::default()).expect("report");
    let rows = csv_rows(&outcome.exponents_csv);
    let fitted: Vec<_> = rows
        .iter()
        .filter(|r| r["window"] != "step 0" && r["site"] != "grad_out")
        .collect();
    assert!(fitted.len() >= 3 * 3 * 4 * 3 * 2, "{}", fitted.len());
    for r in fitted {
        let beta: f64 = r["beta"].parse().expect("beta");
        let pred: f64 = r["predicted"]
            .parse()
            .unwrap_or_else(|_| panic!("no prediction: {r:?}"));
        assert!(
            (pred - common::expected(&r["site"], &r["stat"], beta)).abs() < 0.1,
            "{r:?}"
        );
        assert_eq!(r["agrees"], "true", "{r:?}");
        assert!(
            r["mc_coherent"].is_empty(),
            "no theory run, no MC slope: {r:?}"
        );
        if r["site"] == "fwd" {
            assert!(r["law"].contains("coherent limit"), "{r:?}");
        }
    }
    let html = std::fs::read_to_string(&outcome.index_html).expect("html");
    assert!(html.contains("Average parameter gradient norm"));
    assert!(html.contains("Perplexity vs step"));
    assert!(html.contains("heatmap") || html.contains("Rank exponent of"));
}

#[test]
fn training_predictions_do_not_depend_on_the_other_runs_given() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let theory = theory_run(tmp.path());
    let sweep = tmp.path().join("sweep");
    common::write_train_sweep(&sweep);
    let alone = build_report(
        std::slice::from_ref(&sweep),
        &tmp.path().join("a"),
        &ReportOptions::default(),
    )
    .expect("report");
    let with = build_report(
        &[theory, sweep],
        &tmp.path().join("b"),
        &ReportOptions::default(),
    )
    .expect("report");
    let train = |p: &Path| -> Vec<_> {
        csv_rows(p)
            .into_iter()
            .filter(|r| r["source"] == "train")
            .collect()
    };
    let (a, b) = (train(&alone.exponents_csv), train(&with.exponents_csv));
    assert_eq!(a.len(), b.len());
    let mut with_mc = 0;
    for (x, y) in a.iter().zip(&b) {
        for col in [
            "module",
            "layer",
            "window",
            "site",
            "stat",
            "slope",
            "predicted",
            "law",
            "coherent_limit",
            "incoherent_limit",
            "verdict",
            "agrees",
            "in_band",
        ] {
            assert_eq!(x[col], y[col], "{col}: {x:?} vs {y:?}");
        }
        assert!(
            x["mc_coherent"].is_empty() && x["mc_fresh"].is_empty(),
            "{x:?}"
        );
        with_mc += usize::from(!y["mc_coherent"].is_empty() || !y["mc_fresh"].is_empty());
    }
    assert!(with_mc > 0, "the theory run should give MC slopes");
    // The MC columns are shown only when a theory run is given.
    let html = |p: &Path| std::fs::read_to_string(p).expect("html");
    assert!(!html(&alone.index_html).contains("MC coherent</th>"));
    assert!(html(&with.index_html).contains("MC coherent</th>"));
    // The reading guide states the rule.
    assert!(html(&alone.index_html).contains("never on which other runs are given"));
}

#[test]
fn an_audit_directory_is_searched_for_runs_at_any_depth() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let audit = tmp.path().join("audit-20240101-000000");
    theory_run(&audit);
    let cells = common::write_audit_sweep(&audit);
    let out = tmp.path().join("report");
    let outcome = build_report(
        std::slice::from_ref(&audit),
        &out,
        &ReportOptions::default(),
    )
    .expect("report");
    // theory/ and every cell; not the sweep folder, cells/, checkpoint/ or logs/.
    assert_eq!(outcome.used.len(), 1 + cells.len(), "{:?}", outcome.used);
    assert!(outcome.used.contains(&audit.join("theory")));
    // Only the cell that has not started is reported, in one line naming the sweep's cells.
    assert_eq!(outcome.skipped.len(), 1, "{:?}", outcome.skipped);
    let s = &outcome.skipped[0];
    assert_eq!(s.dir, audit.join("sweep/cells"));
    assert!(
        s.reason.contains("1 of the 19 cells")
            && s.reason.contains("r128")
            && s.reason.contains("not started"),
        "{s:?}"
    );
    let html = std::fs::read_to_string(&outcome.index_html).expect("html");
    let md = std::fs::read_to_string(&outcome.report_md).expect("md");
    for text in [&html, &md] {
        assert!(
            text.contains("diverged at step 25"),
            "no divergence step shown"
        );
        assert!(text.contains("running"), "running cell not shown");
        assert!(
            !text.contains("checkpoint"),
            "checkpoint/ should not be mentioned"
        );
    }
    assert!(
        html.contains("still running or interrupted"),
        "no training note for the running cell"
    );
    // The diverged cell's rows from step 25 on are left out; the running cell's are used.
    let (runs, _) = rankstab_report::load::load_runs(&[audit.join("sweep")]).expect("loads");
    let diverged = runs
        .iter()
        .find(|r| r.id.ends_with("r64-lora-adamw-s0"))
        .expect("diverged cell");
    assert_eq!(diverged.diverged_at, Some(25));
    assert!(!diverged.moments.is_empty() && diverged.moments.iter().all(|r| r.step < 25));
    assert!(diverged
        .metrics
        .iter()
        .all(|r| r.step < 25 || r.metric.as_str() == "diverged"));
    let running = runs
        .iter()
        .find(|r| r.id.ends_with("r64-lora-adamw-s1"))
        .expect("running cell");
    assert_eq!(running.status_text(), "running");
    assert!(running.moments.iter().any(|r| r.step == 40));
}

#[test]
fn a_theory_run_alone_gets_panels_and_tables() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let theory = theory_run(tmp.path());
    let out = tmp.path().join("r");
    let outcome = build_report(&[theory], &out, &ReportOptions::default()).expect("report");
    // 2 optimizers x 2 input regimes x (fwd, fwd_heldout, bwd, B-gradient norm).
    assert_eq!(outcome.figures, 16);
    let html = std::fs::read_to_string(&outcome.index_html).expect("html");
    assert!(!html.contains("id=\"train\""));
    assert!(
        html.contains("no gradient norms") || html.contains("theory run theory"),
        "paper table should use the theory run"
    );
    assert!(html.contains("no held-out perplexity"));
}

#[test]
fn only_unusable_directories_is_an_error_naming_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = build_report(
        &[tmp.path().join("missing")],
        &tmp.path().join("out"),
        &ReportOptions::default(),
    )
    .expect_err("fails");
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(
        !tmp.path().join("out").exists(),
        "nothing is written when nothing is usable"
    );
}
