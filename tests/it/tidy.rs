//! Tidy checks: the module dependency table in docs/architecture.md matches the
//! code, every source file opens with `//!`, and the names the "Life of a
//! statement" in src/lib.rs mentions still exist.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `| module | may import |` table, as module → allowed set.
fn documented_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let doc = fs::read_to_string(root().join("docs/architecture.md")).expect("architecture.md");
    let section = doc
        .split("## Module dependencies")
        .nth(1)
        .expect("a 'Module dependencies' section");
    let mut table = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let module = cells[1].trim_matches('`').to_string();
        let allowed = cells[2]
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        table.insert(module, allowed);
    }
    table
}

#[test]
fn module_dependencies_match_the_architecture_doc() {
    let table = documented_dependencies();
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let Some(module) = rel.components().next().and_then(|c| c.as_os_str().to_str()) else {
            continue;
        };
        if rel.components().count() == 1 {
            continue; // lib.rs and main.rs sit above the modules
        }
        let allowed = table.get(module).unwrap_or_else(|| {
            panic!("module `{module}` is missing from docs/architecture.md's dependency table")
        });
        let text = fs::read_to_string(&file).expect("read source");
        for (n, line) in text.lines().enumerate() {
            for used in line.split("crate::").skip(1) {
                let name: String = used
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module && !allowed.contains(&name) {
                    violations.push(format!(
                        "{}:{}: `{module}` uses `{name}`",
                        rel.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "undocumented module dependencies:\n{}",
        violations.join("\n")
    );
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("tests"), &mut files);
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            !fs::read_to_string(f)
                .expect("read source")
                .trim_start()
                .starts_with("//!")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a //! header:\n{}",
        missing.join("\n")
    );
}

#[test]
fn life_of_a_statement_names_exist() {
    let lib = fs::read_to_string(root().join("src/lib.rs")).expect("lib.rs");
    let mut sources = String::new();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    for f in files {
        sources.push_str(&fs::read_to_string(f).expect("read source"));
    }
    let mut checked = 0;
    for link in lib.split("[`").skip(1) {
        let path = link.split("`]").next().expect("closing bracket");
        let last = path.rsplit("::").next().expect("a name");
        let defined = ["fn ", "struct ", "enum ", "trait ", "mod "]
            .iter()
            .any(|kind| sources.contains(&format!("{kind}{last}")))
            || sources.contains(&format!("    {last} {{"))
            || sources.contains(&format!("    {last},"));
        assert!(defined, "src/lib.rs names `{path}`, which no longer exists");
        checked += 1;
    }
    assert!(
        checked >= 8,
        "expected the walk to name real types, found {checked}"
    );
}
