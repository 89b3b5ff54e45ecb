//! The layer order of README.md's Layout section, held against the code: every `crate::` path
//! under src/ (in `use` lines and inline, test modules aside) names a module of a lower layer
//! than the file's own, or the file's own module. A layer lists modules by path (`store`,
//! `codec::ggml`); a file or an imported path belongs to the longest listed prefix of its module
//! path. A new import against the order fails here with the file and the path, so data keeps
//! flowing one way.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers as README.md lists them in its ```layers block: one line a layer, bottom first,
/// the module paths of that layer separated by spaces (a `#` starts a comment).
fn layers() -> BTreeMap<String, usize> {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let block = readme
        .split("```layers\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README.md has a ```layers block in its Layout section");
    let mut out = BTreeMap::new();
    let lines = block.lines().filter(|l| !l.split('#').next().unwrap_or_default().trim().is_empty());
    for (layer, line) in lines.enumerate() {
        for module in line.split('#').next().unwrap_or_default().split_whitespace() {
            assert!(
                out.insert(module.to_owned(), layer).is_none(),
                "{module} is listed twice in README's layers"
            );
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its test module (tests may use fixtures
/// from anywhere).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// The module paths that `crate::` paths in `code` name (`crate::a::b::C` gives `a::b::C`,
/// `crate::{a, b::c}` gives `a` and `b::c`; a group deeper down counts as its prefix).
fn imported(code: &str) -> Vec<String> {
    let path = |s: &str| -> String {
        let mut out = String::new();
        let mut rest = s;
        loop {
            let ident: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if ident.is_empty() {
                break;
            }
            if !out.is_empty() {
                out.push_str("::");
            }
            out.push_str(&ident);
            match rest[ident.len()..].strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        out
    };
    let mut out = vec![];
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Each item at the group's top level.
            let (mut depth, mut start) = (1, true);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => start = true,
                    c if start && depth == 1 && !c.is_whitespace() => {
                        out.push(path(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(path(rest));
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

/// The listed layer entry a module path belongs to: its longest listed prefix.
fn entry_of<'a>(layers: &'a BTreeMap<String, usize>, path: &str) -> Option<(&'a str, usize)> {
    let segments: Vec<&str> = path.split("::").collect();
    (1..=segments.len()).rev().find_map(|n| {
        let prefix = segments[..n].join("::");
        layers.get_key_value(&prefix).map(|(k, &l)| (k.as_str(), l))
    })
}

#[test]
fn imports_follow_the_readme_layer_order() {
    let layers = layers();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut wrong = vec![];
    let mut unlisted = vec![];
    for path in files {
        let rel = path.strip_prefix(&src).unwrap();
        // The file's module path: src/codec/ggml/mod.rs is codec::ggml, src/check.rs is check.
        let mut module: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned())
            .collect();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        let module = module.join("::");
        if module.ends_with("tests") {
            continue; // a test module in a file of its own (codec/delta/tests.rs)
        }
        if module == "main" || module == "lib" {
            continue; // the binary and the crate root sit above everything
        }
        let Some((own_entry, own)) = entry_of(&layers, &module) else {
            unlisted.push(module);
            continue;
        };
        for target in imported(&code(&fs::read_to_string(&path).unwrap())) {
            match entry_of(&layers, &target) {
                Some((entry, _)) if entry == own_entry => {}
                Some((_, layer)) if layer < own => {}
                Some((entry, layer)) => wrong.push(format!(
                    "{}: crate::{target} ({entry}, layer {layer}) from {own_entry} (layer {own})",
                    rel.display()
                )),
                None => unlisted.push(target),
            }
        }
    }
    unlisted.sort();
    unlisted.dedup();
    assert!(unlisted.is_empty(), "modules not in README's ```layers block: {unlisted:?}");
    assert!(wrong.is_empty(), "imports against README's layer order (bottom first):\n{}", wrong.join("\n"));
}

#[test]
fn the_import_reader_sees_grouped_and_inline_paths() {
    let got = imported("use crate::{a::{B, C}, b, c::d};\nfn f() { crate::e::g(); }\n");
    assert_eq!(got, ["a", "b", "c::d", "e::g"]);
    let layers: BTreeMap<String, usize> = [("c".to_owned(), 0), ("c::d".to_owned(), 1)].into();
    assert_eq!(entry_of(&layers, "c::d::E"), Some(("c::d", 1)));
    assert_eq!(entry_of(&layers, "c::x"), Some(("c", 0)));
    assert_eq!(entry_of(&layers, "z"), None);
    assert!(code("use crate::x; // crate::y\n#[cfg(test)]\nuse crate::z;").contains("crate::x"));
    assert!(!code("use crate::x; // crate::y\n#[cfg(test)]\nuse crate::z;").contains("crate::z"));
}
