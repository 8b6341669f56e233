//! Hostile inputs: see main.rs for which file holds which.
//!
//! `rankstab train` flags, sweep configuration files and training data files: every case
//! must end with exit code 2, one line naming the flag, field or file, and nothing left
//! behind; a few controls check that valid inputs near the limits are still accepted.
use super::harness::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Flag or key changes: (name, value).
type Changes<'a> = Vec<(&'a str, &'a str)>;
/// A train row: flag changes and the fragments the message must hold.
type FlagRow<'a> = (Changes<'a>, Vec<&'a str>);
/// A row naming a file: what it is, the file, changes and fragments.
type FileRow<'a> = (&'a str, &'a Path, Changes<'a>, Vec<String>);
/// A sweep row: top-level changes, [[models]] additions and fragments.
type SweepRow<'a> = (Changes<'a>, &'a str, Vec<&'a str>);

const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ";
const ROW: &str = r#"{"system_prompt": "", "question": "Q?", "response": "A fine answer."}"#;

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn mkfifo(p: &Path) {
    let ok = Command::new("mkfifo")
        .arg(p)
        .status()
        .expect("mkfifo runs")
        .success();
    assert!(ok, "mkfifo {}", p.display());
}

/// `rankstab train` on the tiny Llama with tiny sizes; `changes` replace or add flags
/// (a flag with the value "" is passed alone, as in `--alpha=-1e-300`).
fn train_args(data: &Path, out: &Path, changes: &[(&str, &str)]) -> Vec<String> {
    let mut flags: Vec<(String, String)> = [
        ("--model", s(&tiny_llama())),
        ("--data", s(data)),
        ("--rank", "2".into()),
        ("--steps", "1".into()),
        ("--batch", "2".into()),
        ("--context", "8".into()),
        ("--eval-every", "1".into()),
        ("--out", s(out)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in changes {
        match flags.iter_mut().find(|(f, _)| f == k) {
            Some(slot) => slot.1 = (*v).to_string(),
            None => flags.push(((*k).to_string(), (*v).to_string())),
        }
    }
    let mut args = vec!["train".to_string()];
    for (k, v) in flags {
        args.push(k);
        if !v.is_empty() {
            args.push(v);
        }
    }
    args
}

fn case(name: &str, args: Vec<String>, fragments: &[&str], absent: &[&Path]) -> Case {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Case::err(name, &args, fragments).leaves_nothing(absent)
}

/// A sweep configuration on the tiny Llama: `top` replaces or adds top-level keys (TOML
/// values as written), `model` adds keys to its [[models]] entry.
fn sweep_toml(dir: &Path, name: &str, data: &Path, top: &[(&str, &str)], model: &str) -> PathBuf {
    let mut keys: Vec<(String, String)> = [
        ("data", format!("{:?}", s(data))),
        ("ranks", "[2]".into()),
        ("scalings", "[\"lora\"]".into()),
        ("optimizers", "[\"adamw\"]".into()),
        ("seeds", "[0]".into()),
        ("steps", "1".into()),
        ("batch", "2".into()),
        ("micro_batch", "2".into()),
        ("context", "8".into()),
        ("eval_every", "1".into()),
        ("checkpoint_every", "0".into()),
        ("heldout_fraction", "0.2".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut lr = String::new();
    for (k, v) in top {
        if let Some(rate) = k.strip_prefix("lr.") {
            lr.push_str(&format!("{rate} = {v}\n"));
            continue;
        }
        match keys.iter_mut().find(|(f, _)| f == k) {
            Some(slot) => slot.1 = (*v).to_string(),
            None => keys.push(((*k).to_string(), (*v).to_string())),
        }
    }
    let mut text: String = keys
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    if !lr.is_empty() {
        text.push_str(&format!("[lr]\n{lr}"));
    }
    text.push_str(&format!(
        "[[models]]\nname = \"tiny\"\npath = {:?}\n{model}",
        s(&tiny_llama())
    ));
    write(dir, name, text)
}

fn sweep_args(cfg: &Path, out: &Path) -> Vec<String> {
    vec![
        "sweep".into(),
        "--config".into(),
        s(cfg),
        "--out".into(),
        s(out),
    ]
}

/// Runs an accepted command; panics with its stderr unless it succeeds.
fn accepted(name: &str, args: &[String]) -> String {
    let mut cmd = bin();
    cmd.args(args);
    let o = run_limited(cmd, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{name}: refused: {stderr}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn train_flags_out_of_range_are_refused_before_anything_is_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let text = write(d, "t.txt", TEXT.repeat(8));
    let huge = "4294967297";
    // (flag changes, fragments the message must hold)
    let table: Vec<FlagRow> = vec![
        (vec![("--rank", "0")], vec!["--rank 0", "1..=65536"]),
        (vec![("--rank", "65537")], vec!["--rank 65537", "65536"]),
        (vec![("--rank", huge)], vec!["--rank 4294967297", "65536"]),
        (vec![("--rank", "-1")], vec!["--rank"]),
        (vec![("--rank", "four")], vec!["--rank", "four"]),
        (vec![("--steps", "0")], vec!["--steps 0", "1..=1000000"]),
        (
            vec![("--steps", huge)],
            vec!["--steps 4294967297", "1000000"],
        ),
        (vec![("--steps", "-3")], vec!["--steps"]),
        (vec![("--batch", "0")], vec!["--batch 0", "1..=65536"]),
        (
            vec![("--batch", huge)],
            vec!["--batch 4294967297", "65536", "before memory is allocated"],
        ),
        (
            vec![("--batch", "18446744073709551615")],
            vec!["--batch 18446744073709551615"],
        ),
        (vec![("--batch", "18446744073709551616")], vec!["--batch"]),
        (vec![("--batch", "-1")], vec!["--batch"]),
        (
            vec![("--micro-batch", "3")],
            vec!["--micro-batch 3", "at most the batch (2)"],
        ),
        (
            vec![("--batch", "4"), ("--micro-batch", "3")],
            vec!["--micro-batch 3", "does not divide batch 4"],
        ),
        (
            vec![("--micro-batch", huge)],
            vec!["--micro-batch 4294967297"],
        ),
        (vec![("--context", "0")], vec!["--context 0", "2..=131072"]),
        (vec![("--context", "1")], vec!["--context 1", "2..=131072"]),
        (vec![("--context", "131073")], vec!["--context 131073"]),
        (
            vec![("--context", "18446744073709551615")],
            vec!["--context 18446744073709551615"],
        ),
        (
            vec![("--batch", "64"), ("--context", "32768")],
            vec!["--micro-batch 64", "tokens per pass"],
        ),
        (vec![("--alpha", "0")], vec!["--alpha 0", "(0, 1e6]"]),
        (vec![("--alpha", "-16")], vec!["--alpha -16"]),
        (vec![("--alpha", "NaN")], vec!["--alpha NaN"]),
        (vec![("--alpha", "inf")], vec!["--alpha inf"]),
        (vec![("--alpha", "1e7")], vec!["--alpha 1e7"]),
        (vec![("--lr", "0")], vec!["--lr 0", "[1e-20, 1e30]"]),
        (vec![("--lr", "-0.1")], vec!["--lr -0.1"]),
        (vec![("--lr", "nan")], vec!["--lr NaN"]),
        (vec![("--lr", "inf")], vec!["--lr inf"]),
        (vec![("--lr", "1e31")], vec!["--lr 1e31"]),
        (vec![("--lr", "1e-30")], vec!["--lr 1e-30"]),
        (vec![("--beta", "9")], vec!["--beta 9", "[-4, 4]"]),
        (vec![("--beta", "-5")], vec!["--beta -5"]),
        (vec![("--beta", "nan")], vec!["--beta", "finite"]),
        (
            vec![("--scaling", "beta=9")],
            vec!["--scaling beta=9", "[-4, 4]"],
        ),
        (vec![("--dropout", "1")], vec!["--dropout 1", "[0, 1)"]),
        (vec![("--dropout", "-0.1")], vec!["--dropout -0.1"]),
        (vec![("--dropout", "nan")], vec!["--dropout NaN"]),
        (vec![("--clip-grad-norm", "0")], vec!["--clip-grad-norm 0"]),
        (
            vec![("--clip-grad-norm", "-1")],
            vec!["--clip-grad-norm -1"],
        ),
        (
            vec![("--clip-grad-norm", "inf")],
            vec!["--clip-grad-norm inf"],
        ),
        (
            vec![("--probe-every", huge)],
            vec!["--probe-every 4294967297", "1000000"],
        ),
        (
            vec![("--eval-every", huge)],
            vec!["--eval-every 4294967297"],
        ),
        (
            vec![("--checkpoint-every", huge)],
            vec!["--checkpoint-every 4294967297"],
        ),
        (
            vec![("--heldout-max", huge)],
            vec!["--heldout-max 4294967297", "16777216"],
        ),
        (
            vec![("--max-examples", "0")],
            vec!["--max-examples 0", "2..="],
        ),
        (vec![("--max-examples", "1")], vec!["--max-examples 1"]),
        (
            vec![("--seed", "9007199254740992")],
            vec!["--seed 9007199254740992", "2^53"],
        ),
        (
            vec![("--seed", "18446744073709551615")],
            vec!["--seed 18446744073709551615"],
        ),
        (vec![("--seed", "-1")], vec!["--seed"]),
        (
            vec![("--target-modules", "q_proj,q_proj")],
            vec!["--target-modules", "q_proj appears twice"],
        ),
        (
            vec![("--target-modules", "q_proj,")],
            vec!["--target-modules", "non-empty"],
        ),
        (vec![("--optimizer", "adam")], vec!["adamw or sgd"]),
        (vec![("--dtype", "f8")], vec!["f8"]),
        (vec![("--alpha=-1e-300", "")], vec!["--alpha -1e-300"]),
        (vec![("--context", "1e3")], vec!["--context", "1e3"]),
    ];
    let mut cases = Vec::new();
    for (i, (changes, fragments)) in table.iter().enumerate() {
        let out = d.join(format!("out{i}"));
        let name = format!("train {changes:?}");
        cases.push(case(
            &name,
            train_args(&text, &out, changes),
            fragments,
            &[&out],
        ));
    }
    assert!(run_cases(&cases) >= 55);
}

#[test]
fn train_data_files_and_out_paths_are_refused_with_their_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let text = write(d, "t.txt", TEXT.repeat(8));
    let empty = write(d, "empty.txt", "");
    let blank = write(d, "blank.txt", " \n\t\n");
    let latin1 = write(d, "latin1.txt", b"caf\xe9 au lait ".repeat(20));
    let fifo = d.join("fifo.txt");
    mkfifo(&fifo);
    let folder = d.join("folder.txt");
    std::fs::create_dir(&folder).expect("mkdir");
    let empty_rows = write(d, "empty.jsonl", "");
    let blank_rows = write(d, "blank.jsonl", "\n\n  \n");
    let one_row = write(d, "one.jsonl", format!("{ROW}\n"));
    let bad_row = write(d, "bad.jsonl", format!("{ROW}\n{{\"question\": \"Q\",\n"));
    let no_resp = write(
        d,
        "noresponse.jsonl",
        format!("{ROW}\n{ROW}\n{{\"system_prompt\": \"\", \"question\": \"Q\"}}\n"),
    );
    let latin1_rows = write(
        d,
        "latin1.jsonl",
        [format!("{ROW}\n").as_bytes(), b"{\"q\": \"caf\xe9\"}\n"].concat(),
    );
    let file_out = write(d, "a-file", "not a directory");
    let csv = write(d, "rows.csv", "a,b\n");
    let missing = d.join("absent.txt");
    let dev_zero = PathBuf::from("/dev/zero");
    let table: Vec<FileRow> = vec![
        ("missing text", &missing, vec![], vec![s(&missing)]),
        (
            "empty text",
            &empty,
            vec![],
            vec![s(&empty), "empty".into()],
        ),
        (
            "blank text",
            &blank,
            vec![],
            vec![s(&blank), "empty".into()],
        ),
        (
            "non-UTF-8 text",
            &latin1,
            vec![],
            vec![s(&latin1), "UTF-8".into(), "offset 3".into()],
        ),
        (
            "a FIFO as data",
            &fifo,
            vec![],
            vec![s(&fifo), "regular file".into()],
        ),
        (
            "a directory as data",
            &folder,
            vec![],
            vec![s(&folder), "directory".into()],
        ),
        (
            "/dev/zero as text",
            &dev_zero,
            vec![("--format", "text")],
            vec!["/dev/zero".into(), "regular file".into()],
        ),
        (
            "/dev/zero as rows",
            &dev_zero,
            vec![("--format", "orca")],
            vec!["/dev/zero".into(), "regular file".into()],
        ),
        (
            "empty JSONL",
            &empty_rows,
            vec![],
            vec![s(&empty_rows), "no rows".into()],
        ),
        (
            "blank JSONL",
            &blank_rows,
            vec![],
            vec![s(&blank_rows), "no rows".into()],
        ),
        (
            "one JSONL row",
            &one_row,
            vec![],
            vec![s(&one_row), "need at least 2".into()],
        ),
        (
            "malformed JSONL",
            &bad_row,
            vec![],
            vec![s(&bad_row), "line 2".into(), "malformed JSON".into()],
        ),
        (
            "a row without response",
            &no_resp,
            vec![],
            vec![s(&no_resp), "row 3".into(), "`response`".into()],
        ),
        (
            "non-UTF-8 JSONL",
            &latin1_rows,
            vec![],
            vec![s(&latin1_rows), "line 2".into(), "UTF-8".into()],
        ),
        (
            "unknown extension",
            &csv,
            vec![],
            vec![s(&csv), "\".csv\"".into(), "--format".into()],
        ),
        (
            "a file as --out",
            &text,
            vec![("--out", file_out.to_str().expect("utf-8"))],
            vec![format!("--out {}", s(&file_out)), "is a file".into()],
        ),
    ];
    let mut cases = Vec::new();
    for (i, (name, data, changes, fragments)) in table.iter().enumerate() {
        let out = d.join(format!("out{i}"));
        let frags: Vec<&str> = fragments.iter().map(String::as_str).collect();
        cases.push(case(name, train_args(data, &out, changes), &frags, &[&out]));
    }
    run_cases(&cases);
    assert_eq!(
        std::fs::read_to_string(&file_out).expect("still there"),
        "not a directory"
    );
}

#[test]
fn resuming_another_configuration_is_one_line_naming_what_differs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let text = write(d, "t.txt", TEXT.repeat(8));
    let out = d.join("run");
    accepted("first run", &train_args(&text, &out, &[]));
    // Make it an unfinished run (as if killed): its manifest says running.
    let manifest = out.join("manifest.json");
    let m = std::fs::read_to_string(&manifest).expect("manifest");
    let m = m.replace("\"complete\"", "\"running\"");
    std::fs::write(&manifest, &m).expect("write");
    let before: Vec<_> = std::fs::read_dir(&out)
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let other_text = write(d, "u.txt", TEXT.repeat(9));
    let cases = vec![
        case(
            "another rank",
            train_args(&text, &out, &[("--rank", "4")]),
            &[
                "holds an unfinished run of another configuration",
                "rank: 2 -> 4",
                "choose another --out",
            ],
            &[],
        ),
        case(
            "another lr and seed",
            train_args(&text, &out, &[("--lr", "0.001"), ("--seed", "3")]),
            &["lr: ", "seed: 0 -> 3"],
            &[],
        ),
        case(
            "another data file",
            train_args(&other_text, &out, &[]),
            &["data: ", "u.txt"],
            &[],
        ),
    ];
    run_cases(&cases);
    let after: Vec<_> = std::fs::read_dir(&out)
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(before, after, "the run directory changed");
    assert_eq!(std::fs::read_to_string(&manifest).expect("manifest"), m);
}

#[test]
fn sweep_fields_out_of_range_duplicates_and_unknown_keys_are_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let text = write(d, "t.txt", TEXT.repeat(8));
    let huge = "4294967297";
    let many_seeds = format!(
        "[{}]",
        (0..1000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let many_ranks = format!(
        "[{}]",
        (1..=200)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // (top-level changes, [[models]] additions, fragments)
    let table: Vec<SweepRow> = vec![
        (
            vec![("ranks", "[0]")],
            "",
            vec!["ranks = [.., 0, ..]", "1..=65536"],
        ),
        (vec![("ranks", "[65537]")], "", vec!["ranks", "65537"]),
        (
            vec![("ranks", "[]")],
            "",
            vec!["ranks = []", "must not be empty"],
        ),
        (
            vec![("ranks", "[2, 4, 2]")],
            "",
            vec!["ranks = [2, 4, 2]", "2 appears twice", "replication"],
        ),
        (
            vec![],
            "ranks = [2, 2]\n",
            vec!["models[0].ranks", "appears twice"],
        ),
        (vec![], "ranks = [0]\n", vec!["models[0].ranks"]),
        (
            vec![("seeds", "[0, 0]")],
            "",
            vec![
                "seeds = [0, 0]",
                "duplicate seeds make duplicate cells that look like replication",
            ],
        ),
        (
            vec![("seeds", "[9007199254740992]")],
            "",
            vec!["seeds", "2^53"],
        ),
        (vec![("seeds", "[-1]")], "", vec!["seeds"]),
        (
            vec![("seeds", "[]")],
            "",
            vec!["seeds", "must not be empty"],
        ),
        (
            vec![],
            "seeds = [1, 1]\n",
            vec!["models[0].seeds", "appears twice"],
        ),
        (
            vec![("scalings", "[\"lora\", \"lora\"]")],
            "",
            vec!["scalings", "lora appears twice"],
        ),
        (
            vec![("scalings", "[\"lora\", \"beta=1\"]")],
            "",
            vec!["scalings", "lora appears twice", "its beta"],
        ),
        (
            vec![("scalings", "[\"beta=9\"]")],
            "",
            vec!["scalings", "[-4, 4]"],
        ),
        (
            vec![("scalings", "[]")],
            "",
            vec!["scalings", "must not be empty"],
        ),
        (
            vec![("optimizers", "[\"adamw\", \"adamw\"]")],
            "",
            vec!["optimizers", "adamw appears twice"],
        ),
        (vec![("optimizers", "[\"adam\"]")], "", vec!["adamw or sgd"]),
        (
            vec![],
            "optimizers = [\"sgd\", \"sgd\"]\n",
            vec!["models[0].optimizers", "appears twice"],
        ),
        (
            vec![("moments", "[2, 2]")],
            "",
            vec!["moments", "2 appears twice"],
        ),
        (vec![("moments", "[0]")], "", vec!["moments", "1..=8"]),
        (vec![("moments", "[9]")], "", vec!["moments", "1..=8"]),
        (
            vec![("moments", "[]")],
            "",
            vec!["moments", "must not be empty"],
        ),
        (
            vec![],
            "target_modules = [\"q_proj\", \"q_proj\"]\n",
            vec!["models[0].target_modules", "q_proj appears twice"],
        ),
        (vec![("steps", "0")], "", vec!["steps = 0", "1..=1000000"]),
        (vec![("steps", huge)], "", vec!["steps = 4294967297"]),
        (vec![], "steps = 0\n", vec!["models[0].steps = 0"]),
        (vec![("batch", "0")], "", vec!["batch = 0"]),
        (
            vec![("batch", huge)],
            "",
            vec!["batch = 4294967297", "65536"],
        ),
        (
            vec![("batch", "4"), ("micro_batch", "3")],
            "",
            vec!["micro_batch = 3", "does not divide"],
        ),
        (
            vec![("micro_batch", "5")],
            "",
            vec!["micro_batch = 5", "at most the batch"],
        ),
        (
            vec![("context", "1")],
            "",
            vec!["context = 1", "2..=131072"],
        ),
        (vec![("context", huge)], "", vec!["context = 4294967297"]),
        (vec![("alpha", "0.0")], "", vec!["alpha = 0", "(0, 1e6]"]),
        (vec![("alpha", "-1.0")], "", vec!["alpha = -1"]),
        (vec![("alpha", "nan")], "", vec!["alpha = NaN"]),
        (vec![("alpha", "inf")], "", vec!["alpha = inf"]),
        (vec![("alpha", "1e7")], "", vec!["alpha = 1e7"]),
        (vec![("lr.adamw", "0.0")], "", vec!["lr.adamw = 0"]),
        (vec![("lr.adamw", "nan")], "", vec!["lr.adamw = NaN"]),
        (vec![("lr.sgd", "-1.0")], "", vec!["lr.sgd = -1"]),
        (vec![("lr.sgd", "inf")], "", vec!["lr.sgd = inf"]),
        (vec![("dropout", "1.0")], "", vec!["dropout = 1", "[0, 1)"]),
        (vec![("dropout", "-0.5")], "", vec!["dropout = -0.5"]),
        (
            vec![("heldout_fraction", "0.0")],
            "",
            vec!["heldout_fraction = 0", "(0, 1)"],
        ),
        (
            vec![("heldout_fraction", "1.0")],
            "",
            vec!["heldout_fraction = 1"],
        ),
        (
            vec![("heldout_fraction", "nan")],
            "",
            vec!["heldout_fraction = NaN"],
        ),
        (
            vec![("heldout_max", huge)],
            "",
            vec!["heldout_max = 4294967297"],
        ),
        (
            vec![("eval_every", huge)],
            "",
            vec!["eval_every = 4294967297"],
        ),
        (
            vec![("probe_every", huge)],
            "",
            vec!["probe_every = 4294967297"],
        ),
        (
            vec![("norm_every", huge)],
            "",
            vec!["norm_every = 4294967297"],
        ),
        (
            vec![("checkpoint_every", huge)],
            "",
            vec!["checkpoint_every = 4294967297"],
        ),
        (vec![("max_examples", "1")], "", vec!["max_examples = 1"]),
        (
            vec![("clip_grad_norm", "0.0")],
            "",
            vec!["clip_grad_norm = 0"],
        ),
        (
            vec![("clip_grad_norm", "nan")],
            "",
            vec!["clip_grad_norm = NaN"],
        ),
        (vec![("batch", "-4")], "", vec!["batch"]),
        (
            vec![("steps", "99999999999999999999999")],
            "",
            vec!["steps"],
        ),
        (vec![("colour", "1")], "", vec!["colour"]),
        (vec![("lr.adam", "0.1")], "", vec!["adam"]),
        (vec![], "colour = 1\n", vec!["colour"]),
        (vec![("dtype", "\"f8\"")], "", vec!["f8"]),
        (vec![("format", "\"csv\"")], "", vec!["csv"]),
        (vec![("data", "\"\"")], "", vec!["data = \"\""]),
        (
            vec![("seeds", &many_seeds), ("ranks", &many_ranks)],
            "",
            vec!["more than 100000 cells"],
        ),
        (
            vec![],
            "preset = \"gpt-j-mini\"\n",
            vec!["models[0]", "exactly one of path and preset"],
        ),
        (
            vec![],
            "[[models]]\nname = \"tiny\"\npreset = \"gpt-j-mini\"\ntokenizer = \"t\"\n",
            vec!["models[1].name", "used twice"],
        ),
    ];
    let mut cases = Vec::new();
    for (i, (top, model, fragments)) in table.iter().enumerate() {
        let cfg = sweep_toml(d, &format!("s{i}.toml"), &text, top, model);
        let out = d.join(format!("out{i}"));
        let mut frags = fragments.clone();
        let shown = s(&cfg);
        frags.push(&shown);
        cases.push(case(
            &format!("sweep {top:?} {model:?}"),
            sweep_args(&cfg, &out),
            &frags,
            &[&out],
        ));
    }
    assert!(run_cases(&cases) >= 60);
}

#[test]
fn sweep_inputs_are_checked_before_sweep_json_or_cells_are_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let text = write(d, "t.txt", TEXT.repeat(8));
    let empty = write(d, "empty.txt", "");
    let blank = write(d, "blank.txt", "\n \n");
    let latin1 = write(d, "latin1.txt", b"\xff\xfe text".repeat(10));
    let fifo = d.join("fifo.txt");
    mkfifo(&fifo);
    let folder = d.join("folder.txt");
    std::fs::create_dir(&folder).expect("mkdir");
    let empty_rows = write(d, "empty.jsonl", "");
    let bad_rows = write(
        d,
        "bad.jsonl",
        format!("{ROW}\n{{\"system_prompt\": \"\", \"question\": \"Q\", \"response\": 7}}\n"),
    );
    let one_row = write(d, "one.jsonl", format!("{ROW}\n"));
    let missing = d.join("absent.txt");
    let dev_zero = PathBuf::from("/dev/zero");
    let mut cases = Vec::new();
    let data_table: Vec<FileRow> = vec![
        (
            "missing data",
            &missing,
            vec![],
            vec![s(&missing), "does not exist".into()],
        ),
        (
            "empty data",
            &empty,
            vec![],
            vec![s(&empty), "empty".into()],
        ),
        (
            "blank data",
            &blank,
            vec![],
            vec![s(&blank), "empty".into()],
        ),
        (
            "non-UTF-8 data",
            &latin1,
            vec![],
            vec![s(&latin1), "UTF-8".into(), "offset 0".into()],
        ),
        (
            "a FIFO as data",
            &fifo,
            vec![],
            vec![s(&fifo), "regular file".into()],
        ),
        (
            "a directory as data",
            &folder,
            vec![],
            vec![s(&folder), "directory".into()],
        ),
        (
            "/dev/zero as data",
            &dev_zero,
            vec![("format", "\"text\"")],
            vec!["/dev/zero".into(), "regular file".into()],
        ),
        (
            "an empty JSONL",
            &empty_rows,
            vec![],
            vec![s(&empty_rows), "no rows".into()],
        ),
        (
            "a JSONL with a bad row",
            &bad_rows,
            vec![],
            vec![
                s(&bad_rows),
                "row 2".into(),
                "`response`".into(),
                "not a string".into(),
            ],
        ),
        (
            "a JSONL of one row",
            &one_row,
            vec![],
            vec![s(&one_row), "need at least 2".into()],
        ),
    ];
    for (i, (name, data, top, fragments)) in data_table.iter().enumerate() {
        let cfg = sweep_toml(d, &format!("d{i}.toml"), data, top, "");
        let out = d.join(format!("out-d{i}"));
        let frags: Vec<&str> = fragments.iter().map(String::as_str).collect();
        cases.push(case(name, sweep_args(&cfg, &out), &frags, &[&out]));
    }
    // The configuration file itself.
    let good = sweep_toml(d, "good.toml", &text, &[], "");
    let cfg_fifo = d.join("fifo.toml");
    mkfifo(&cfg_fifo);
    let big = write(d, "big.toml", format!("# {}\n", "x".repeat(2 << 20)));
    let binary = write(d, "binary.toml", b"data = \"\xff\"\n");
    let empty_cfg = write(d, "empty.toml", "");
    let absent = d.join("absent.toml");
    let model_missing = sweep_toml(d, "nomodel.toml", &text, &[], "")
        .display()
        .to_string();
    let text_cfg = std::fs::read_to_string(&model_missing)
        .expect("read")
        .replace("tiny-llama", "no-such-model");
    let model_missing = write(d, "nomodel.toml", text_cfg);
    let cfg_table: Vec<(&str, &Path, Vec<String>)> = vec![
        (
            "a FIFO as configuration",
            &cfg_fifo,
            vec![s(&cfg_fifo), "regular file".into()],
        ),
        (
            "/dev/zero as configuration",
            Path::new("/dev/zero"),
            vec!["/dev/zero".into(), "regular file".into()],
        ),
        (
            "a directory as configuration",
            &folder,
            vec![s(&folder), "directory".into()],
        ),
        (
            "a 2 MiB configuration",
            &big,
            vec![s(&big), "1.0 MiB".into()],
        ),
        (
            "a non-UTF-8 configuration",
            &binary,
            vec![s(&binary), "UTF-8".into()],
        ),
        (
            "an empty configuration",
            &empty_cfg,
            vec![s(&empty_cfg), "models".into()],
        ),
        ("a missing configuration", &absent, vec![s(&absent)]),
        (
            "a missing model",
            &model_missing,
            vec!["no-such-model".into(), "does not exist".into()],
        ),
    ];
    for (i, (name, cfg, fragments)) in cfg_table.iter().enumerate() {
        let out = d.join(format!("out-c{i}"));
        let frags: Vec<&str> = fragments.iter().map(String::as_str).collect();
        cases.push(case(name, sweep_args(cfg, &out), &frags, &[&out]));
    }
    // --out: a file, and somebody's non-empty directory.
    let file_out = write(d, "a-file", "mine");
    let theirs = d.join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    write(&theirs, "notes.txt", "mine");
    cases.push(case(
        "a file as --out",
        sweep_args(&good, &file_out),
        &[&s(&file_out), "is a file"],
        &[],
    ));
    cases.push(case(
        "a non-empty directory without sweep.json as --out",
        sweep_args(&good, &theirs),
        &[&s(&theirs), "holds no sweep.json"],
        &[&theirs.join("sweep.json"), &theirs.join("cells")],
    ));
    cases.push(case(
        "--cell beyond the sweep",
        [
            sweep_args(&good, &d.join("out-cell")),
            vec!["--cell".into(), "4294967297".into()],
        ]
        .concat(),
        &["--cell 4294967297", "cells 0..=0"],
        &[&d.join("out-cell")],
    ));
    assert!(run_cases(&cases) >= 20);
    assert_eq!(std::fs::read_to_string(&file_out).expect("kept"), "mine");
}

#[test]
fn valid_inputs_near_the_limits_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A JSONL whose first line starts with a byte-order mark trains (so does a text).
    let rows = format!("\u{feff}{ROW}\n{ROW}\n{ROW}\n{ROW}\n");
    let bom_rows = write(d, "bom.jsonl", rows);
    let out = d.join("bom-rows");
    let stdout = accepted(
        "BOM JSONL",
        &train_args(&bom_rows, &out, &[("--context", "48")]),
    );
    assert!(stdout.contains("held-out loss"), "{stdout}");
    let bom_text = write(d, "bom.txt", format!("\u{feff}{}", TEXT.repeat(8)));
    accepted("BOM text", &train_args(&bom_text, &d.join("bom-text"), &[]));
    // Values at the limits of the cheap flags (the run stays tiny).
    let text = write(d, "t.txt", TEXT.repeat(8));
    accepted(
        "limits",
        &train_args(
            &text,
            &d.join("limits"),
            &[
                ("--lr", "1e30"),
                ("--alpha", "1e6"),
                ("--beta", "-4"),
                ("--seed", "9007199254740991"),
                ("--eval-every", "1000000"),
                ("--heldout-max", "16777216"),
                ("--max-examples", "2"),
                ("--dropout", "0.99"),
            ],
        ),
    );
    // A valid tiny sweep passes validation, runs, and --list lists its cells.
    let cfg = sweep_toml(
        d,
        "ok.toml",
        &bom_rows,
        &[
            ("ranks", "[1, 2]"),
            ("seeds", "[0, 9007199254740991]"),
            ("context", "48"),
        ],
        "",
    );
    let out = d.join("sweep");
    let stdout = accepted("valid sweep", &sweep_args(&cfg, &out));
    assert!(stdout.contains("4 cell(s) run"), "{stdout}");
    assert!(out.join("sweep.json").exists());
    let list = accepted(
        "list",
        &[sweep_args(&cfg, &out), vec!["--list".into()]].concat(),
    );
    assert!(
        list.contains("complete  003-tiny-r2-lora-adamw-s9007199254740991"),
        "{list}"
    );
}
