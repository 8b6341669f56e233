//! A whole report from a small theory run and a synthetic training sweep: files, numbers
//! recovered from the training fixture, the rule's outcomes (a right law agrees, a wrong one
//! disagrees, too few seeds or ranks leave everything inconclusive), an old theory run judged
//! again, the findings' conditions, figures, escaping.
mod common;

use rankstab_records::{Layer, Outcome, Site, Stat, Verdict, Window};
use rankstab_report::analyse::{analyse, Analysis, AnalysisOptions};
use rankstab_report::{build_report, ExponentRow, ReportOptions};
use std::path::{Path, PathBuf};

/// The analysis of the run directories `dirs` (no files written).
fn analysis_of(dirs: &[PathBuf]) -> Analysis {
    let (runs, skipped) = rankstab_report::load::load_runs(dirs).expect("loads");
    analyse(&runs, &skipped, &AnalysisOptions::default())
}

/// The training rows of an analysis.
fn train_rows(a: &Analysis) -> &[ExponentRow] {
    &a.train.as_ref().expect("a training section").rows
}

/// The rows the exact first-step law predicts: |fwd|^2 at step 1.
fn is_law_row(r: &ExponentRow) -> bool {
    r.window == Window::step(1) && r.site == Site::Fwd && r.stat == Stat::Abs
}

/// The verdict a slope of `want` must get from the fixture's tight fits.
fn verdict_of(want: f64) -> Verdict {
    if want.abs() < 1e-9 {
        Verdict::Stable
    } else if want < 0.0 {
        Verdict::Collapsing
    } else {
        Verdict::Exploding
    }
}

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
    assert_eq!(outcome.used.len(), 1 + 30, "{:?}", outcome.used);
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
    // Figures are inline SVG (vector), one <figure> each, no raster in the page.
    assert_eq!(
        html.matches("<figure class=\"plot\"").count(),
        outcome.figures
    );
    assert!(!html.contains("<img"));
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
    // Written outside the repository: the links point at the copy of proofs/ next to it.
    assert!(
        unescaped.contains("href=\"proofs/finite-rank.md\""),
        "no link to proofs/finite-rank.md"
    );
    assert!(out.join("proofs/finite-rank.md").is_file());
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
    let mut law_rows = 0;
    for r in &train {
        let beta: f64 = r["beta"].parse().expect("beta");
        let slope: f64 = r["slope"].parse().expect("slope");
        let want = common::expected(&r["site"], &r["stat"], beta);
        assert_eq!(r["seeds"], "3", "{r:?}");
        if r["site"] == "grad_out" {
            assert!(slope.abs() < 0.05, "{r:?}");
            assert_eq!(r["predicted"], "", "grad_out has no law: {r:?}");
            assert_eq!(r["outcome"], "inconclusive", "{r:?}");
            continue;
        }
        assert!(
            (slope - want).abs() < 0.05,
            "slope {slope} vs {want}: {r:?}"
        );
        // Stability from the interval against the resolution band: the fixture's fits are tight.
        assert_eq!(r["verdict"], verdict_of(want).to_string(), "{r:?}");
        if r["window"] == "step 1" && r["site"] == "fwd" && r["stat"] == "abs" {
            // The exact first-step law of the runs' own law rows, tested on the paired
            // difference: it is the measured rows' expectation, so it agrees.
            let pred: f64 = r["predicted"]
                .parse()
                .unwrap_or_else(|_| panic!("no prediction: {r:?}"));
            assert!(
                (pred - want).abs() < 1e-9,
                "predicted {pred} vs {want}: {r:?}"
            );
            assert_eq!(r["law"], "exact first step", "{r:?}");
            let diff: f64 = r["diff"].parse().expect("a paired difference");
            let band: f64 = r["band"].parse().expect("a band");
            assert!(diff.abs() < 0.02 && band > 0.05 && band < 0.15, "{r:?}");
            assert_eq!(r["outcome"], "agrees", "{r:?}");
            // Distinct rivals (the incoherent limit, SGD's law, and for rsLoRA also slope 0)
            // are all rejected.
            assert_eq!(r["discriminating"], "true", "{r:?}");
            let distinct: u32 = r["rivals_distinct"].parse().expect("count");
            assert!(distinct >= 2, "{r:?}");
            assert_eq!(r["rivals_rejected"], r["rivals_distinct"], "{r:?}");
            law_rows += 1;
        } else {
            assert_eq!(r["predicted"], "", "only the exact law predicts: {r:?}");
            assert!(r["law"].starts_with("none: "), "{r:?}");
            assert_eq!(r["outcome"], "inconclusive", "{r:?}");
        }
        if r["stat"] == "abs" || r["stat"].starts_with("grad_norm") {
            // The Monte Carlo slope of the matching setting comes from the theory run.
            assert!(!r["mc_coherent"].is_empty(), "no MC slope: {r:?}");
        }
        checked += 1;
    }
    assert!(checked >= 24, "{checked}");
    // Pooled over layers: 3 modules x 2 scalings.
    assert_eq!(law_rows, 6);
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
fn training_runs_alone_are_judged_against_their_law_rows() {
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
    // 3 modules x (2 layers + pooled) x 4 statistics x 4 windows x 2 scalings.
    assert!(fitted.len() >= 3 * 3 * 4 * 4 * 2, "{}", fitted.len());
    let mut agree = 0;
    for r in fitted {
        let beta: f64 = r["beta"].parse().expect("beta");
        let want = common::expected(&r["site"], &r["stat"], beta);
        assert!(
            r["mc_coherent"].is_empty(),
            "no theory run, no MC slope: {r:?}"
        );
        if r["window"] == "step 1" && r["site"] == "fwd" && r["stat"] == "abs" {
            let pred: f64 = r["predicted"]
                .parse()
                .unwrap_or_else(|_| panic!("no prediction: {r:?}"));
            assert!((pred - want).abs() < 1e-9, "{r:?}");
            assert_eq!(r["outcome"], "agrees", "{r:?}");
            agree += 1;
        } else {
            assert_eq!(r["predicted"], "", "{r:?}");
            assert_eq!(r["outcome"], "inconclusive", "{r:?}");
            assert_eq!(r["verdict"], verdict_of(want).to_string(), "{r:?}");
        }
    }
    assert_eq!(agree, 3 * 3 * 2);
    let html = std::fs::read_to_string(&outcome.index_html).expect("html");
    assert!(
        html.contains(
            "of the 6 fits that can tell their law from a rival: 6 agree, 0 disagree, 0 inconclusive; \
             15 of 15 distinct rivals rejected (100%) (fits per module on the mean over layers; per-layer fits, a \
             family of their own: of the 12 fits that can tell their law from a rival: 12 agree"
        ),
        "no training headline: {}",
        html.split("that can tell").nth(1).unwrap_or("").chars().take(500).collect::<String>()
    );
    assert!(html.contains("Average parameter gradient norm"));
    assert!(html.contains("Perplexity vs step"));
    assert!(html.contains("heatmap") || html.contains("Rank exponent of"));
}

#[test]
fn a_law_off_by_a_slope_of_one_disagrees() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sweep = tmp.path().join("sweep");
    let spec = common::Sweep {
        law_offset: Some(1.0),
        ..common::Sweep::default()
    };
    common::write_sweep(&sweep, &spec);
    let a = analysis_of(&[sweep]);
    let rows = train_rows(&a);
    let law: Vec<&ExponentRow> = rows.iter().filter(|r| is_law_row(r)).collect();
    assert_eq!(law.len(), 3 * 3 * 2);
    for r in &law {
        let want = common::expected("fwd", "abs", r.beta);
        let pred = r.predicted.expect("a prediction");
        assert!((pred - (want + 1.0)).abs() < 1e-9, "{r:?}");
        let diff = r.diff.expect("a paired difference");
        assert!((diff + 1.0).abs() < 0.02, "{r:?}");
        assert!(r.diff_ci_high.expect("interval") < -0.9, "{r:?}");
        assert_eq!(r.outcome, Outcome::Disagrees, "{r:?}");
        // The measurement itself is as before: stability and rivals do not use the law.
        assert_eq!(r.verdict, verdict_of(want), "{r:?}");
    }
    let t = a.train.as_ref().expect("train");
    assert_eq!(
        (t.counts.disagrees, t.counts.agrees),
        (6, 0),
        "{:?}",
        t.counts
    );
    assert!(rows
        .iter()
        .filter(|r| !is_law_row(r))
        .all(|r| r.outcome == Outcome::Inconclusive && r.predicted.is_none()));
}

#[test]
fn too_few_seeds_or_ranks_leave_every_training_outcome_inconclusive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, spec, why) in [
        (
            "two-seeds",
            common::Sweep {
                seeds: vec![0, 1],
                ..common::Sweep::default()
            },
            "2 seeds common to every rank (>= 3 needed)",
        ),
        (
            "four-ranks",
            common::Sweep {
                ranks: vec![4, 8, 16, 32],
                ..common::Sweep::default()
            },
            "4 ranks 4,8,16,32 (>= 5 needed)",
        ),
    ] {
        let dir = tmp.path().join(name);
        common::write_sweep(&dir, &spec);
        let a = analysis_of(&[dir]);
        let rows = train_rows(&a);
        assert!(!rows.is_empty());
        for r in rows {
            assert_eq!(r.outcome, Outcome::Inconclusive, "{name}: {r:?}");
            assert!(matches!(r.verdict, Verdict::Undetermined), "{name}: {r:?}");
            assert!(
                !r.rivals.contains(" rejected"),
                "{name}: nothing is rejected unjudged: {r:?}"
            );
        }
        // The law still gives its prediction, shown but not judged.
        assert!(rows.iter().any(|r| is_law_row(r) && r.predicted.is_some()));
        let notes = &a.train.as_ref().expect("train").notes;
        for scaling in ["lora", "rslora"] {
            let note = notes
                .iter()
                .find(|n| n.starts_with(&format!("{} adamw {scaling} (lr", common::MODEL)))
                .unwrap_or_else(|| panic!("{name}: no note for {scaling}: {notes:?}"));
            assert!(
                note.contains("not judged") && note.contains(why),
                "{name}: {note}"
            );
            assert!(note.contains(">= 3 seeds and >= 5 ranks"), "{note}");
        }
    }
}

#[test]
fn the_largest_rank_must_reach_an_eighth_of_the_smallest_adapted_module() {
    // The smallest adapted module is q_proj / v_proj (d = min(in, out) = 128, from the run's
    // config.run.modules): ranks up to 16 = 128/8 judge every module, down_proj (d = 256)
    // included; ranks up to 8 judge none.
    let tmp = tempfile::tempdir().expect("tempdir");
    for (ranks, want) in [
        (vec![1, 2, 4, 8, 16], Outcome::Agrees),
        (vec![1, 2, 4, 6, 8], Outcome::Inconclusive),
    ] {
        let dir = tmp.path().join(format!("sweep-{}", ranks[4]));
        let spec = common::Sweep {
            ranks: ranks.clone(),
            ..common::Sweep::default()
        };
        common::write_sweep(&dir, &spec);
        let a = analysis_of(&[dir]);
        let law: Vec<&ExponentRow> = train_rows(&a).iter().filter(|r| is_law_row(r)).collect();
        assert_eq!(law.len(), 3 * 3 * 2);
        for r in &law {
            assert_eq!(r.outcome, want, "{ranks:?}: {r:?}");
        }
        let notes = &a.train.as_ref().expect("train").notes;
        let said = notes.iter().any(|n| {
            n.contains(&format!(
                "largest rank 8 below d/8 = 16 (smallest adapted module of {}, d = 128)",
                common::MODEL
            ))
        });
        assert_eq!(said, want == Outcome::Inconclusive, "{ranks:?}: {notes:?}");
    }
}

#[test]
fn runs_without_law_rows_get_no_prediction_and_say_why() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("sweep");
    let spec = common::Sweep {
        law_offset: None,
        ..common::Sweep::default()
    };
    common::write_sweep(&dir, &spec);
    let a = analysis_of(&[dir]);
    let t = a.train.as_ref().expect("train");
    for r in &t.rows {
        assert!(
            r.predicted.is_none() && r.outcome == Outcome::Inconclusive,
            "{r:?}"
        );
        if is_law_row(r) {
            assert!(r.law.contains("no law rows"), "{r:?}");
        }
    }
    // Rivals and stability are still judged.
    assert!(t.counts.rivals_rejected == 0 && t.counts.discriminating == 0);
    assert!(t
        .rows
        .iter()
        .any(|r| r.rivals.contains("rejected (not distinct)")));
    assert!(
        t.law_note.contains("no law rows")
            || t.law_note.contains("No training run given has law rows")
    );
}

#[test]
fn an_old_theory_run_is_judged_again_by_today_s_rule() {
    // The example as committed before law rows and outcomes existed (its fits.json has
    // `agrees`; tests/fixtures/README.md). It loads, and its fits are recomputed from its
    // moments.
    let old = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/old-theory-small");
    let a = analysis_of(&[old]);
    assert_eq!(a.theory.len(), 1);
    let sec = &a.theory[0];
    assert!(
        sec.fits_from.contains("fitted and judged here"),
        "{}",
        sec.fits_from
    );
    assert!(!sec.rows.is_empty());
    let mut two_term = 0;
    for r in &sec.rows {
        // Every fit is set against its rivals.
        assert!(!r.rivals.is_empty(), "{r:?}");
        if r.stat.is_moment() {
            let exact = !r.optimizer.is_adaptive() && r.m == 2 && r.window == Window::step(1);
            assert_eq!(r.predicted.is_some(), exact, "{r:?}");
            if exact {
                assert!(r.law.starts_with("two-term law"), "{r:?}");
                two_term += 1;
            } else {
                assert!(r.law.contains("no law rows"), "{r:?}");
                assert_eq!(r.outcome, Outcome::Inconclusive, "{r:?}");
            }
        }
    }
    assert!(two_term > 0);
    assert!(
        sec.rows.iter().any(|r| r.rivals_rejected > 0),
        "no rival rejected"
    );
    assert!(sec.rows.iter().any(|r| r.layer == Layer::Index(0)));
}

#[test]
fn findings_claim_only_what_was_measured() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Random weights, one learning rate: the perplexity comparison is not made.
    let preset = tmp.path().join("preset");
    common::write_train_sweep(&preset);
    let a = analysis_of(&[preset]);
    let ppl = a
        .paper
        .iter()
        .find(|p| p.finding.starts_with("Best perplexity"))
        .expect("perplexity row");
    assert!(ppl.ours.starts_with("not tested here"), "{ppl:?}");
    assert!(
        ppl.ours.contains("random weights (preset:tiny-llama)"),
        "{ppl:?}"
    );
    assert!(ppl.ours.contains("one learning rate"), "{ppl:?}");
    assert!(!ppl.ours.contains("seed"), "3 seeds are enough: {ppl:?}");
    assert_eq!(ppl.comparable, "not tested");
    // Gradient norms: the factor over the measured ranks only.
    let norms: Vec<_> = a
        .paper
        .iter()
        .filter(|p| p.finding.contains("gradient norm") && p.source.starts_with("training"))
        .collect();
    assert_eq!(norms.len(), 2, "{:?}", a.paper);
    for p in norms {
        assert!(
            p.ours.contains("over r = 2..32") && p.ours.contains("from r=2 to 32"),
            "{p:?}"
        );
        assert!(p.ours.contains("not measured at r = 2048"), "{p:?}");
        assert!(p.comparable.starts_with("shape only"), "{p:?}");
    }
    // A pretrained model, two learning rates per rank and scaling, 3 seeds: compared.
    let tuned = tmp.path().join("tuned");
    common::write_sweep(
        &tuned,
        &common::Sweep {
            lrs: vec![5e-5, 1e-4],
            model: "/models/tiny-llama".into(),
            ..common::Sweep::default()
        },
    );
    let a = analysis_of(&[tuned]);
    let ppl = a
        .paper
        .iter()
        .find(|p| p.finding.starts_with("Best perplexity"))
        .expect("perplexity row");
    assert!(
        ppl.ours.contains("best LoRA (r=") && ppl.ours.contains("vs rsLoRA r=32"),
        "{ppl:?}"
    );
    assert!(!ppl.ours.contains("not tested"), "{ppl:?}");
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
            "law",
            "predicted",
            "band",
            "diff",
            "diff_ci_low",
            "diff_ci_high",
            "outcome",
            "verdict",
            "discriminating",
            "rivals",
            "rivals_distinct",
            "rivals_rejected",
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
    // The reading guide states the rule, and which runs make up the family.
    let guide = html(&alone.index_html);
    assert!(guide.contains("adding theory runs changes none"));
    assert!(guide.contains("Benjamini-Hochberg"));
    // Some training outcome is decided, so the comparison above means something.
    assert!(b.iter().any(|r| r["outcome"] == "agrees"));
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
        s.reason.contains("1 of the 33 cells")
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
    // The headline figure, then 2 optimizers x 2 input regimes x (fwd, fwd_heldout, bwd,
    // B-gradient norm).
    assert_eq!(outcome.figures, 1 + 16);
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

#[test]
fn two_runs_sharing_a_seed_under_different_configurations_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sweep = tmp.path().join("sweep");
    common::write_train_sweep(&sweep);
    // The cell r=4 lora seed 0 once more, from other weights: a different experiment.
    let other = tmp.path().join("other-r4-lora-s0");
    let cell = common::Cell {
        rank: 4,
        scaling: "lora",
        beta: 1.0,
        seed: 0,
        lr: common::LR,
    };
    let spec = common::Sweep {
        model: "/models/another-checkpoint".into(),
        ..common::Sweep::default()
    };
    common::write_train_run(
        &other,
        cell,
        &spec,
        rankstab_records::RunStatus::Complete,
        None,
    );
    let err = rankstab_report::load::load_runs(&[sweep.clone(), other.clone()])
        .expect_err("two experiments under one seed are refused");
    let msg = err.to_string();
    assert!(
        matches!(err, rankstab_report::ReportError::SharedSeed { .. }),
        "{msg}"
    );
    assert!(msg.contains(&other.display().to_string()), "{msg}");
    assert!(msg.contains("-r4-lora-s0"), "names the sweep's run: {msg}");
    assert!(msg.contains("seed 0"), "{msg}");
    assert!(
        msg.contains("run/model (\"preset:tiny-llama\" vs \"/models/another-checkpoint\")")
            || msg.contains("run/model (\"/models/another-checkpoint\" vs \"preset:tiny-llama\")"),
        "{msg}"
    );
    // The same report is refused too, and nothing is written.
    let out = tmp.path().join("report");
    assert!(build_report(&[sweep.clone(), other], &out, &ReportOptions::default()).is_err());
    assert!(!out.join("index.html").exists());
    // The same cell run again under the same configuration is a deterministic repeat: kept.
    let again = tmp.path().join("again-r4-lora-s0");
    common::write_train_run(
        &again,
        cell,
        &common::Sweep::default(),
        rankstab_records::RunStatus::Complete,
        None,
    );
    rankstab_report::load::load_runs(&[sweep, again]).expect("a repeat is not a conflict");
}

/// Every `href` and `src` of a page that names a local file, resolved against `dir`.
fn local_links(html: &str, dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for attr in ["href=\"", "src=\""] {
        for piece in html.split(attr).skip(1) {
            // minijinja escapes '/' in attributes; browsers decode it.
            let link = piece
                .split('"')
                .next()
                .unwrap_or_default()
                .replace("&#x2f;", "/");
            let link = link.as_str();
            if link.starts_with('#')
                || link.starts_with("http:")
                || link.starts_with("https:")
                || link.starts_with("data:")
                || link.is_empty()
            {
                continue;
            }
            let path = link.split('#').next().unwrap_or_default();
            out.push((link.to_string(), dir.join(path)));
        }
    }
    out
}

#[test]
fn links_to_the_proofs_resolve_wherever_the_report_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let theory = theory_run(tmp.path());
    let repo_proofs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proofs");
    // Outside the repository (a temporary directory), with and without a known proofs/.
    for proofs_dir in [Some(repo_proofs.clone()), None] {
        let out = tmp
            .path()
            .join(format!("elsewhere-{}", proofs_dir.is_some()));
        let opts = ReportOptions {
            proofs_dir,
            ..ReportOptions::default()
        };
        let o = build_report(std::slice::from_ref(&theory), &out, &opts).expect("report");
        let html = std::fs::read_to_string(&o.index_html).expect("html");
        let md = std::fs::read_to_string(&o.report_md).expect("md");
        let links = local_links(&html, &out);
        assert!(
            links.iter().any(|(l, _)| l.ends_with("exact-law.md")),
            "no link to the proofs: {links:?}"
        );
        for (link, path) in &links {
            assert!(
                path.exists(),
                "{link} does not resolve from {}",
                out.display()
            );
        }
        assert!(
            md.contains("](proofs/verdicts.md)"),
            "markdown links the copy"
        );
        // The copies are the repository's files, and they link only to each other.
        let copy = std::fs::read_to_string(out.join("proofs/adam.md")).expect("copied");
        assert_eq!(
            copy,
            std::fs::read_to_string(repo_proofs.join("adam.md")).expect("repo")
        );
    }
    // Inside the repository the links are relative to the repository's proofs/, no copy.
    let inside = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-inside-repo");
    let _ = std::fs::remove_dir_all(&inside);
    let opts = ReportOptions {
        proofs_dir: Some(repo_proofs),
        ..ReportOptions::default()
    };
    let o = build_report(std::slice::from_ref(&theory), &inside, &opts).expect("report");
    let html = std::fs::read_to_string(&o.index_html).expect("html");
    assert!(
        !inside.join("proofs").exists(),
        "no copy inside the repository"
    );
    for (link, path) in local_links(&html, &inside) {
        assert!(path.exists(), "{link} does not resolve");
    }
}

#[test]
fn the_report_opens_with_the_verdict_and_the_headline_figure() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let theory = theory_run(tmp.path());
    let sweep = tmp.path().join("sweep");
    common::write_train_sweep(&sweep);
    let out = tmp.path().join("report");
    let o = build_report(
        &[theory.clone(), sweep.clone()],
        &out,
        &ReportOptions::default(),
    )
    .expect("report");
    let html = std::fs::read_to_string(&o.index_html).expect("html");
    let verdict = html.find("id=\"verdict\"").expect("a verdict card");
    let headline = html.find("id=\"fig-headline\"").expect("a headline figure");
    let first_section = html
        .find("<details class=\"section\"")
        .expect("folded sections");
    assert!(verdict < headline && headline < first_section);
    // Every other section is folded; figures are inline SVG, no raster.
    assert!(!html.contains("data:image/png"));
    assert_eq!(html.matches("<figure class=\"plot\"").count(), o.figures);
    assert_eq!(html.matches("<details class=\"section\" open").count(), 0);
    // One provenance table.
    let prov = &html[html.find("id=\"provenance\"").expect("provenance")..];
    let prov = &prov[..prov.find("</details>\n\n").unwrap_or(prov.len())];
    assert_eq!(prov.matches("<table").count(), 1, "one provenance table");
    // Sentences for theory and training, each with ranks, seeds and a plain outcome.
    let h = &o.headline;
    assert!(h.sentences.iter().any(|s| s.source == "theory"));
    assert!(h.sentences.iter().any(|s| s.source == "train"));
    for s in &h.sentences {
        assert!(s.text.contains(" ranks "), "{}", s.text);
        assert!(
            s.text.contains(" seeds") || s.text.contains(" trials"),
            "{}",
            s.text
        );
        let plain = rankstab_report::render::escape_html(&s.text).replace("&#x2f;", "/");
        assert!(html.replace("&#x2f;", "/").contains(&plain), "{}", s.text);
    }
    // The training fixture's law is right: its sentences say it holds, and rsLoRA is not
    // called rank-flat under Adam (its moments grow as r^1 there).
    let train = h
        .sentences
        .iter()
        .find(|s| s.source == "train")
        .expect("train");
    assert_eq!(train.outcome, Outcome::Agrees, "{}", train.text);
    assert!(
        train.text.contains("the theorem's prediction holds"),
        "{}",
        train.text
    );
    assert!(
        train.text.contains("Rank-stable here: standard LoRA;"),
        "{}",
        train.text
    );
    assert_eq!(
        rankstab_report::headline(&[theory, sweep]).expect("headline"),
        *h
    );
    // Markdown: the verdict comes first.
    let md = std::fs::read_to_string(&o.report_md).expect("md");
    assert!(
        md.find("## Is it rank-stable?").expect("verdict")
            < md.find("## How to read").expect("guide")
    );
}
