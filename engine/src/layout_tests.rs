//! The invariants of docs/ARCHITECTURE.md that the source itself can show, checked on it:
//! only the store and the subscriptions open SQLite, core does no I/O, the engine's folders
//! import only downward, and one module alone may use `unsafe`.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, with its text (but this one, whose code names what it looks
/// for).
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("a source folder") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "layout_tests.rs")
            {
                let text = std::fs::read_to_string(&path).expect("a source file");
                out.push((path, text));
            }
        }
    }
    out.sort();
    out
}

/// The code of a file without its comment lines and its tests (from a line that is exactly
/// `#[cfg(test)]` on: tests come last in every file), so words in documentation and test
/// helpers do not count.
fn code(text: &str) -> String {
    text.lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a `crate::` path at the start of `rest` names: `store` for
/// `crate::store::Store`, `store` and `net` for `crate::{store::Store, net::gossip}`.
fn named_modules(rest: &str) -> Vec<String> {
    let ident = |text: &str| -> String {
        text.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = rest.strip_prefix('{') else {
        return vec![ident(rest)];
    };
    let mut depth = 0usize;
    let mut names = Vec::new();
    let mut start = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                names.push(ident(&group[start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                names.push(ident(&group[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    names
}

fn relative(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

#[test]
fn grouped_imports_name_every_module() {
    assert_eq!(named_modules("store::Store;"), ["store"]);
    assert_eq!(
        named_modules("{store::{Store, X}, net::gossip, http};"),
        ["store", "net", "http"]
    );
}

#[test]
fn only_the_store_and_the_subscriptions_open_sqlite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed = |file: &str| {
        file.starts_with("store/") || file == "subs/storage.rs" || file == "subs/workers.rs"
    };
    let mut offenders = Vec::new();
    let mut openers = 0;
    for (path, text) in sources(&root) {
        let file = relative(&path, &root);
        if code(&text).contains("Connection::open") {
            openers += 1;
            if !allowed(&file) {
                offenders.push(file);
            }
        }
    }
    assert!(
        openers >= 2,
        "the scan found no opener: is the source where it should be?"
    );
    assert!(
        offenders.is_empty(),
        "SQLite opened outside store/ and subs/: {offenders:?}"
    );
}

#[test]
fn core_does_no_io() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/src");
    let forbidden = [
        "std::fs",
        "std::net",
        "std::thread",
        "tokio",
        "rusqlite",
        "Instant::now",
        "SystemTime",
        "rand::",
    ];
    let files = sources(&root);
    assert!(
        files.len() > 10,
        "core's source not found at {}",
        root.display()
    );
    let mut offenders = Vec::new();
    for (path, text) in files {
        let code = code(&text);
        for word in forbidden {
            if code.contains(word) {
                offenders.push(format!("{}: {word}", relative(&path, &root)));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "I/O, clocks or global randomness in core: {offenders:?}"
    );
}

#[test]
fn the_engine_folders_import_only_downward() {
    // docs/ARCHITECTURE.md: metrics, logging < store < net, subs < config < http < agent < cli.
    let layer = |module: &str| match module {
        "metrics" | "logging" => Some(0),
        "store" => Some(1),
        "net" | "subs" => Some(2),
        "config" => Some(3),
        "http" => Some(4),
        "agent" => Some(5),
        "cli" => Some(6),
        _ => None,
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    for (path, text) in sources(&root) {
        let file = relative(&path, &root);
        let own = file
            .split(['/', '.'])
            .next()
            .unwrap_or_default()
            .to_string();
        let Some(own_layer) = layer(&own) else {
            continue;
        };
        let code = code(&text);
        for (at, _) in code.match_indices("crate::") {
            for target in named_modules(&code[at + "crate::".len()..]) {
                let Some(target_layer) = layer(&target) else {
                    continue;
                };
                // The one upward edge by design: subscriptions use the API's shapes, which
                // depend on nothing of the engine.
                let shapes = own == "subs" && code[at..].starts_with("crate::http::types");
                if target_layer > own_layer && !shapes {
                    offenders.push(format!("{file} -> {target}"));
                }
            }
        }
    }
    offenders.sort();
    offenders.dedup();
    assert!(
        offenders.is_empty(),
        "imports against the layering: {offenders:?}"
    );
}

#[test]
fn unsafe_code_is_allowed_in_one_module() {
    // The workspace denies `unsafe`; a module may lift that for itself only, and only the
    // store's own prepared statements do (SQLite's handles, kept beside the connection).
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = 0;
    let mut allowed = Vec::new();
    for member in [
        "core", "engine", "sim", "model", "tests", "bench", "loadgen",
    ] {
        let root = workspace.join(member);
        for (path, text) in sources(&root) {
            if path.components().any(|c| c.as_os_str() == "target") {
                continue;
            }
            files += 1;
            if text.contains("allow(unsafe_code)") {
                allowed.push(format!("{member}/{}", relative(&path, &root)));
            }
        }
    }
    assert!(files > 50, "the workspace's source not found");
    assert_eq!(allowed, ["engine/src/store/prepared.rs"]);
}
