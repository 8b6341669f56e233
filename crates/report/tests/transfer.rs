//! Learning-rate transfer studies in the report: a real small study (`rankstab_theory::
//! transfer::run`) alone and beside theory and training runs, its section in both outputs
//! (figures with the expected marks, tables with one row per exponent, finding and horizon
//! row), its sentences on the first screen, a study found inside a run root, and an
//! unfinished study reported with its reason, never a panic.
mod common;

use rankstab_report::{build_report, ReportError, ReportOptions};
use rankstab_theory::transfer::analyse::TransferSummary;
use rankstab_theory::transfer::{self, Study, TransferConfig};
use rankstab_theory::{NoProgress, RunOptions};
use std::path::{Path, PathBuf};

fn tiny() -> TransferConfig {
    TransferConfig {
        ranks: vec![2, 4, 8],
        widths: vec![],
        width: 32,
        seeds: 2,
        steps: 20,
        bootstrap: 100,
        lrs_sgd: "1e-3:1e1:9".parse().expect("grid"),
        lrs_adam: "1e-4:1e0:9".parse().expect("grid"),
        ..Default::default()
    }
}

/// A finished tiny study in `dir`; returns its summary.
fn study(dir: &Path, cfg: &TransferConfig) -> TransferSummary {
    let out = transfer::run(cfg, dir, &RunOptions::default(), &NoProgress).expect("transfer run");
    out.summary.expect("complete")
}

fn opts() -> ReportOptions {
    ReportOptions {
        generated: Some("2024-01-01T00:00:00Z".into()),
        ..ReportOptions::default()
    }
}

/// The SVG of figure `name` under `out/figures`, parsed: (number of `<circle>`, number of
/// `<polygon>`, every text).
fn svg_counts(out: &Path, name: &str) -> (usize, usize, Vec<String>) {
    let text = std::fs::read_to_string(out.join("figures").join(format!("{name}.svg")))
        .unwrap_or_else(|e| panic!("{name}.svg: {e}"));
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{name}.svg: {e}"));
    let count = |tag: &str| doc.descendants().filter(|n| n.has_tag_name(tag)).count();
    let texts = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
        .collect();
    (count("circle"), count("polygon"), texts)
}

/// Rows of the HTML table with class `class` (header excluded).
fn html_rows(html: &str, class: &str) -> usize {
    let start = html
        .find(&format!("<table class=\"{class}\">"))
        .unwrap_or_else(|| panic!("no table {class}"));
    let end = start + html[start..].find("</table>").expect("table end");
    html[start..end].matches("<tr>").count() - 1
}

/// Markdown table rows under the heading `heading` (header and rule excluded).
fn md_rows(md: &str, heading: &str) -> usize {
    let start = md.find(heading).unwrap_or_else(|| panic!("no {heading}"));
    md[start..]
        .lines()
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .count()
        - 2
}

#[test]
fn a_transfer_study_alone_makes_a_report_with_its_section() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("transfer");
    let summary = study(&dir, &tiny());
    let out = tmp.path().join("report");
    let outcome = build_report(std::slice::from_ref(&dir), &out, &opts()).expect("report");
    assert_eq!(outcome.used, std::slice::from_ref(&dir));
    assert!(outcome.skipped.is_empty(), "{:?}", outcome.skipped);
    // No width axis: the four rank figures, no headline figure (no moment fits).
    assert_eq!(outcome.figures, 4);
    // (minijinja escapes '/' as &#x2f;; browsers decode it.)
    let html = std::fs::read_to_string(&outcome.index_html)
        .expect("index.html")
        .replace("&#x2f;", "/");
    let md = std::fs::read_to_string(&outcome.report_md).expect("report.md");
    assert!(
        html.contains("Learning-rate transfer transfer"),
        "no section"
    );
    assert!(
        md.contains("## Learning-rate transfer transfer"),
        "no md section"
    );
    assert_eq!(
        html.matches("<figure class=\"plot\"").count(),
        outcome.figures
    );
    assert!(!html.contains("id=\"fig-headline\""));

    // Tables: one row per exponent, finding and horizon row, and per cell.
    assert!(!summary.exponents.is_empty() && !summary.findings.is_empty());
    assert_eq!(
        html_rows(&html, "transfer-exponents"),
        summary.exponents.len()
    );
    assert_eq!(
        html_rows(&html, "transfer-findings"),
        summary.findings.len()
    );
    assert_eq!(html_rows(&html, "transfer-horizon"), summary.horizon.len());
    assert_eq!(html_rows(&html, "transfer-cells"), summary.cells.len());
    assert_eq!(
        md_rows(&md, "### Exponents of lr\\*"),
        summary.exponents.len()
    );
    assert_eq!(md_rows(&md, "### Published claims"), summary.findings.len());
    assert_eq!(
        md_rows(&md, "### The forward moment's rank exponent"),
        summary.horizon.len()
    );
    for f in &summary.findings {
        let claim = rankstab_report::render::escape_html(&f.claim);
        assert!(html.contains(&claim), "finding missing: {}", f.claim);
    }

    // Figures: the expected marks. Settings: sgd and adam x LoRA and rsLoRA, one init and
    // ratio: four panels; three ranks each.
    let rank_cells: Vec<_> = summary
        .cells
        .iter()
        .filter(|c| c.axis == Study::Rank)
        .collect();
    assert_eq!(rank_cells.len(), 4 * 3);
    let panels = 4;
    let svg = |what: &str| format!("transfer-transfer-{what}");
    // (a) A dot per finite point of every curve, a triangle per lr* (and one in the legend).
    let finite: usize = rank_cells
        .iter()
        .map(|c| c.curve.iter().filter(|p| p.loss.is_some()).count())
        .sum();
    let located = rank_cells.iter().filter(|c| c.lr_opt.is_some()).count();
    let (circles, polygons, texts) = svg_counts(&out, &svg("loss-vs-lr"));
    assert_eq!(circles, finite, "loss curves: one dot per finite point");
    assert_eq!(
        polygons,
        located + 1,
        "one triangle per lr* and the legend's"
    );
    for r in ["r = 2", "r = 4", "r = 8"] {
        assert!(texts.iter().any(|t| t == r), "legend lacks {r}: {texts:?}");
    }
    let any_diverged = rank_cells
        .iter()
        .any(|c| c.curve.iter().any(|p| p.loss.is_none()));
    assert_eq!(
        texts.iter().any(|t| t.contains("some seed diverged")),
        any_diverged,
        "the legend names the diverged marks exactly when there are some"
    );
    // Log axes: learning rates at decades.
    for t in ["0.001", "0.01", "0.1", "1", "10"] {
        assert!(texts.iter().any(|x| x == t), "no lr tick {t}: {texts:?}");
    }
    // (b) A dot per lr* (and one per panel's legend); a triangle per cell at the grid's
    // edge (and one in the legend of each panel that has some).
    let edges = rank_cells.iter().filter(|c| c.edge.is_some()).count();
    let edge_panels = {
        let mut s: Vec<_> = rank_cells
            .iter()
            .filter(|c| c.edge.is_some())
            .map(|c| (c.optimizer, c.beta.to_bits()))
            .collect();
        s.sort();
        s.dedup();
        s.len()
    };
    let (circles, polygons, texts) = svg_counts(&out, &svg("lr-opt-vs-rank"));
    assert_eq!(circles, located + panels);
    assert_eq!(polygons, edges + edge_panels);
    let with_law = {
        let mut s: Vec<_> = rank_cells
            .iter()
            .filter(|c| c.predicted_lr.is_some())
            .map(|c| (c.optimizer, c.beta.to_bits()))
            .collect();
        s.sort();
        let n = s.len();
        s.dedup();
        assert!(
            n == 0 || n == 3 * s.len(),
            "the law's line covers every rank of a setting"
        );
        s.len()
    };
    assert_eq!(
        texts
            .iter()
            .filter(|t| t.starts_with("long-horizon law"))
            .count(),
        with_law
    );
    // (c) loss at lr*, (d) effective rank with y = r.
    let with_loss = rank_cells
        .iter()
        .filter(|c| c.loss_at_opt.is_some())
        .count();
    assert_eq!(
        svg_counts(&out, &svg("loss-at-opt-vs-rank")).0,
        with_loss + panels
    );
    let with_eff = rank_cells
        .iter()
        .filter(|c| c.effective_rank.is_some_and(|v| v > 0.0))
        .count();
    let (circles, _, texts) = svg_counts(&out, &svg("effective-rank"));
    assert_eq!(circles, with_eff + panels);
    assert!(texts.iter().any(|t| t.starts_with("y = r")));
    // Rank ticks at every rank.
    for r in ["2", "4", "8"] {
        assert!(texts.iter().any(|t| t == r), "no rank tick {r}");
    }

    // The first screen: one sentence per rank exponent.
    let rank_exps: Vec<_> = summary
        .exponents
        .iter()
        .filter(|e| e.axis == Study::Rank)
        .collect();
    let sentences: Vec<_> = outcome
        .headline
        .sentences
        .iter()
        .filter(|s| s.source == "transfer")
        .collect();
    assert_eq!(sentences.len(), rank_exps.len());
    for (s, e) in sentences.iter().zip(&rank_exps) {
        assert_eq!(s.outcome, e.outcome);
        assert!(s.text.starts_with("Under "), "{}", s.text);
        assert!(s.text.contains("ranks 2..8, 2 seeds"), "{}", s.text);
        match e.slope {
            Some(c) => assert!(s.text.contains(&format!("lr* ~ r^{c:+.2}")), "{}", s.text),
            None => assert!(s.text.contains("not located"), "{}", s.text),
        }
        let text = rankstab_report::render::escape_html(&s.text);
        assert!(html.contains(&text), "sentence not on the page: {}", s.text);
    }
    assert!(outcome
        .verdicts
        .iter()
        .any(|v| v.starts_with("transfer transfer: ")));
    // Provenance counts the study's runs, not moments.
    assert!(html.contains("12 lr* cells"), "provenance");
}

#[test]
fn theory_training_and_transfer_runs_make_one_report() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let theory = common::write_theory_run(tmp.path(), vec![2]);
    let sweep = tmp.path().join("sweep");
    common::write_train_sweep(&sweep);
    let tr = tmp.path().join("transfer");
    let mut cfg = tiny();
    cfg.optimizers = vec![rankstab_records::Optimizer::Sgd];
    cfg.widths = vec![16, 32, 64];
    cfg.width_rank = 4;
    let summary = study(&tr, &cfg);
    let out = tmp.path().join("report");
    let outcome = build_report(&[theory, sweep, tr.clone()], &out, &opts()).expect("report");
    let html = std::fs::read_to_string(&outcome.index_html).expect("index.html");
    for needle in [
        "Theory run theory",
        "Training runs",
        "Learning-rate transfer transfer",
    ] {
        assert!(html.contains(needle), "lacks {needle}");
    }
    let sources: Vec<&str> = outcome
        .headline
        .sentences
        .iter()
        .map(|s| s.source.as_str())
        .collect();
    assert!(sources.starts_with(&["theory"]), "{sources:?}");
    assert!(
        sources.contains(&"train") && sources.ends_with(&["transfer"]),
        "{sources:?}"
    );
    assert!(
        html.contains("id=\"fig-headline\""),
        "the headline figure stays"
    );
    // The width axis adds lr* vs width, one panel per setting (sgd x 2 scalings).
    assert!(summary.cells.iter().any(|c| c.axis == Study::Width));
    assert!(out
        .join("figures/transfer-transfer-lr-opt-vs-width.svg")
        .is_file());
    let (_, _, texts) = svg_counts(&out, "transfer-transfer-lr-opt-vs-width");
    for d in ["16", "32", "64"] {
        assert!(texts.iter().any(|t| t == d), "no width tick {d}");
    }
    assert_eq!(
        html_rows(&html, "transfer-exponents"),
        summary.exponents.len()
    );
    assert!(summary.exponents.iter().any(|e| e.axis == Study::Width));
}

#[test]
fn a_transfer_study_inside_a_run_root_is_found() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("runs/audit-x");
    common::write_theory_run(&root, vec![2]);
    study(&root.join("transfer"), &tiny());
    let (found, skipped) = rankstab_report::load::expand(&root).expect("lists");
    let rel: Vec<PathBuf> = found
        .iter()
        .map(|p| p.strip_prefix(&root).expect("inside").to_path_buf())
        .collect();
    assert_eq!(rel, [Path::new("theory"), Path::new("transfer")]);
    assert!(skipped.is_empty(), "{skipped:?}");
    let (runs, _) = rankstab_report::load::load_runs(&[root]).expect("loads");
    let kinds: Vec<_> = runs.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [
            rankstab_report::RunKind::Theory,
            rankstab_report::RunKind::Transfer
        ]
    );
}

#[test]
fn an_unfinished_transfer_study_is_skipped_with_its_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("transfer");
    let partial = RunOptions {
        max_trials_this_run: Some(1),
        ..RunOptions::default()
    };
    let out = transfer::run(&tiny(), &dir, &partial, &NoProgress).expect("one seed");
    assert!(!out.complete && !dir.join(transfer::SUMMARY).exists());
    // Alone: no usable run, one line naming the study and why.
    let err = build_report(std::slice::from_ref(&dir), &tmp.path().join("r1"), &opts())
        .expect_err("nothing usable");
    assert!(matches!(err, ReportError::NoUsableRuns { .. }), "{err}");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(
        msg.contains("transfer study unfinished") && msg.contains("1 of 2 seeds done"),
        "{msg}"
    );
    // Beside a usable run: reported as not used, the rest written.
    let theory = common::write_theory_run(tmp.path(), vec![2]);
    let outcome =
        build_report(&[theory, dir.clone()], &tmp.path().join("r2"), &opts()).expect("report");
    assert_eq!(outcome.skipped.len(), 1);
    assert_eq!(outcome.skipped[0].dir, dir);
    assert!(outcome.skipped[0].reason.contains("no transfer.json yet"));
    let html = std::fs::read_to_string(&outcome.index_html).expect("index.html");
    assert!(html.contains("transfer study unfinished"));
    assert!(!html.contains("Learning-rate transfer"));
    // A finished study whose transfer.json was removed names the file.
    transfer::run(&tiny(), &dir, &RunOptions::default(), &NoProgress).expect("finish");
    std::fs::remove_file(dir.join(transfer::SUMMARY)).expect("rm");
    let err = rankstab_report::load::load_run(&dir).expect_err("no summary");
    assert!(err.to_string().contains("no transfer.json"), "{err}");
    // A damaged transfer.json names the file.
    std::fs::write(dir.join(transfer::SUMMARY), "{ not json").expect("write");
    let err = rankstab_report::load::load_run(&dir).expect_err("bad json");
    assert!(err.to_string().contains("transfer.json"), "{err}");
}
