//! Every derivation in proofs/ names the tests that check it; each named test must exist.
use std::path::Path;

#[test]
fn every_named_test_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut named = 0;
    for entry in std::fs::read_dir(root.join("proofs")).expect("proofs/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("md") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        // References look like `crates/x/tests/file.rs::test_name` (in backticks).
        for chunk in text.split('`') {
            let Some((file, name)) = chunk.split_once(".rs::") else {
                continue;
            };
            if file.contains(' ')
                || name.is_empty()
                || !name.chars().all(|c| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            let file = root.join(format!("{file}.rs"));
            let src = std::fs::read_to_string(&file).unwrap_or_else(|_| {
                panic!(
                    "{}: names {}, which does not exist",
                    path.display(),
                    file.display()
                )
            });
            assert!(
                src.contains(&format!("fn {name}(")),
                "{}: names test `{name}`, which {} does not define",
                path.display(),
                file.display()
            );
            named += 1;
        }
    }
    assert!(named >= 6, "proofs/ name only {named} tests");
}
