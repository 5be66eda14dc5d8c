//! The one-way flow check: no module of `agent-monitor` may import a module downstream of
//! it (issue 12). Every `.rs` file under `agent-monitor/src` is parsed with `syn`; each
//! reference to another top-level module (`use crate::x::..`, grouped `use crate::{x, y}`,
//! `crate::x::f()` or `crate::x::T` anywhere in code, `super::..` chains that climb to the
//! crate root, `crate::` paths inside macro arguments, and the crate-root macros that
//! `#[macro_export]` puts at `crate::`) is checked against [`LAYERS`].

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// The flow, bottom layer first. A module may import modules of its own layer or of an
/// earlier one, never of a later one.
///
/// - `boundedfile`, `ratelog`, `errors` and `journal` (the `agent-monitor-api` journal
///   re-exported at the crate root) are utilities every layer may use.
/// - `probes` → `events` → `identity` → `policy` → `detect` → `api` → `outputs` is the
///   pipeline itself: kernel programs and ring buffers, decoded records, who did it, the
///   rules, the verdict, the API schema, where the records go. `policy` sits below `detect`
///   because detection evaluates the loaded policy. `api` (the generated `agent_monitor.v1`
///   messages, the conversions from records and anomalies to them and back, their proto3
///   JSON) sits below `outputs` because every output (gRPC, journal, JSON lines, Falco,
///   metrics, `tail`) reads the converted form, and above `detect` because it converts its
///   anomalies.
/// - Above the pipeline, the runners, the file schema and the wiring, each on its own
///   layer:
///   - `watching` keeps the kernel's file-identity maps current; it drives `probes` and
///     `identity` only, and `monitor` starts it.
///   - `monitor` runs the live flow (probes to outputs) with the settings it is given
///     (`monitor::MonitorSettings`) and starts `watching`.
///   - `replay` runs detection and the outputs over a recorded journal, beside the live
///     run: nothing below it knows about it.
///   - `config` is the schema of the config file and nothing else. It reuses a few of the
///     pipeline's types and defaults, so it sits above every module it configures; those
///     modules define their own runtime settings types (`probes::ProbeSettings`,
///     `identity::IdentitySettings`, `detect::DetectSettings`, `monitor::MonitorSettings`)
///     and never read `config`. The conversions are in one place, `app::settings`.
///   - `preflight` checks a machine and a config before a run (it builds outputs and
///     policies from the config to see that they can be built).
///   - `app` wires a config to the runners and owns shutdown.
///   - `cli` parses the command line and calls `app`, `replay` and `preflight`.
pub const LAYERS: &[&[&str]] = &[
    &["boundedfile", "yaml", "ratelog", "errors", "journal"],
    &["probes"],
    &["events"],
    &["identity"],
    &["policy"],
    &["detect"],
    &["api"],
    &["outputs"],
    &["watching"],
    &["monitor"],
    &["replay"],
    &["config"],
    &["preflight"],
    &["app"],
    &["cli"],
];

/// Crate-root files: they declare the modules and are exempt.
const EXEMPT: &[&str] = &["lib.rs", "main.rs"];

/// One import of a downstream (or unknown) module.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation {
    pub file: String,
    pub line: usize,
    pub from: String,
    pub to: String,
    /// The imported module is in no layer of [`LAYERS`].
    pub unknown: bool,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unknown {
            write!(
                f,
                "{}:{}: module {} imports {}, which is in no layer of xtask/src/layers.rs",
                self.file, self.line, self.from, self.to
            )
        } else {
            write!(
                f,
                "{}:{}: module {} imports {}, which is downstream of it",
                self.file, self.line, self.from, self.to
            )
        }
    }
}

/// The layer index of a top-level module, or `None` when no layer lists it.
fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Runs the check over `root/agent-monitor/src`; fails listing every violation.
pub fn check(root: &Path) -> Result<()> {
    let src = root.join("agent-monitor/src");
    let mut files = Vec::new();
    collect_rs(&src, &mut files)?;
    files.sort();
    let mut sources = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).unwrap_or(path).to_path_buf();
        if rel.components().count() == 1 && EXEMPT.iter().any(|e| rel == Path::new(e)) {
            continue;
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        sources.push((rel, text));
    }
    let display_prefix = Path::new("agent-monitor/src");
    let mut violations = Vec::new();
    // `#[macro_export]` macros live at the crate root; each belongs to the module that
    // defines it.
    let mut macros = BTreeMap::new();
    for (rel, text) in &sources {
        let file = syn::parse_file(text).with_context(|| format!("parsing {}", rel.display()))?;
        let module = top_module(rel);
        for name in exported_macros(&file) {
            macros.insert(name, module.clone());
        }
    }
    for (rel, text) in &sources {
        let shown = display_prefix.join(rel).display().to_string();
        violations.extend(check_source(&shown, rel, text, &macros)?);
    }
    if violations.is_empty() {
        println!(
            "xtask layers: {} files, no module imports one downstream of it",
            sources.len()
        );
        return Ok(());
    }
    for v in &violations {
        eprintln!("{v}");
    }
    bail!(
        "{} import(s) go against the flow declared in xtask/src/layers.rs",
        violations.len()
    )
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `detect/state.rs` → `detect`, `config.rs` → `config`.
fn top_module(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.strip_suffix(".rs").unwrap_or(&first).to_string()
}

/// How deep the file's module is below the crate root: `config.rs` and `detect/mod.rs` are
/// 1, `detect/state.rs` is 2.
fn file_depth(rel: &Path) -> usize {
    let n = rel.components().count();
    let is_mod = rel.file_name().is_some_and(|f| f == "mod.rs");
    if is_mod {
        n - 1
    } else {
        n
    }
}

fn exported_macros(file: &syn::File) -> Vec<String> {
    struct Finder(Vec<String>);
    impl<'ast> Visit<'ast> for Finder {
        fn visit_item_macro(&mut self, m: &'ast syn::ItemMacro) {
            let exported = m.attrs.iter().any(|a| a.path().is_ident("macro_export"));
            if let (true, Some(ident)) = (exported, &m.ident) {
                self.0.push(ident.to_string());
            }
        }
    }
    let mut finder = Finder(Vec::new());
    finder.visit_file(file);
    finder.0
}

/// Checks one file. `shown` names it in the output, `rel` is its path under `src/` (which
/// gives its module and depth), `macros` maps crate-root macros to their module.
pub fn check_source(
    shown: &str,
    rel: &Path,
    text: &str,
    macros: &BTreeMap<String, String>,
) -> Result<Vec<Violation>> {
    let file = syn::parse_file(text).with_context(|| format!("parsing {shown}"))?;
    let module = top_module(rel);
    let Some(own_layer) = layer_of(&module) else {
        bail!("{shown}: module {module} is in no layer of xtask/src/layers.rs");
    };
    let mut refs = Refs {
        depth: file_depth(rel),
        macros,
        found: Vec::new(),
    };
    refs.visit_file(&file);
    let mut out = Vec::new();
    for (line, to) in refs.found {
        if to == module {
            continue;
        }
        let (downstream, unknown) = match layer_of(&to) {
            Some(l) => (l > own_layer, false),
            None => (true, true),
        };
        let v = Violation {
            file: shown.to_string(),
            line,
            from: module.clone(),
            to,
            unknown,
        };
        if downstream && !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// Collects `(line, top-level module)` for every reference that leaves the file's module.
struct Refs<'m> {
    /// Module depth below the crate root at the current point (inline `mod`s add one).
    depth: usize,
    macros: &'m BTreeMap<String, String>,
    found: Vec<(usize, String)>,
}

impl Refs<'_> {
    /// Resolves a path given as its leading identifiers: `crate::x::..` → `x`,
    /// `super::super::x` at depth 2 → `x`. A crate-root macro resolves to its module.
    fn resolve(&self, segments: &[String]) -> Option<String> {
        let rest = match segments.first().map(String::as_str) {
            Some("crate") => &segments[1..],
            Some("super") => {
                let supers = segments.iter().take_while(|s| *s == "super").count();
                if supers != self.depth {
                    return None;
                }
                &segments[supers..]
            }
            _ => return None,
        };
        let first = rest.first()?;
        Some(
            self.macros
                .get(first)
                .cloned()
                .unwrap_or_else(|| first.clone()),
        )
    }

    fn record(&mut self, span: proc_macro2::Span, segments: &[String]) {
        if let Some(module) = self.resolve(segments) {
            self.found.push((span.start().line, module));
        }
    }

    /// Walks a `use` tree, `prefix` holding the segments above `tree`.
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.record(n.ident.span(), prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.record(r.ident.span(), prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(g) => {
                // `use crate::*` reaches every module; `use crate::x::*` resolves to `x`.
                prefix.push("*".to_string());
                self.record(g.star_token.span, prefix);
                prefix.pop();
            }
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }

    /// Finds `crate :: x` and `super :: .. :: x` in a macro's unparsed tokens.
    fn tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < trees.len() {
            match &trees[i] {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id) if id == "crate" || id == "super" => {
                    let span = id.span();
                    let mut segments = vec![id.to_string()];
                    let mut j = i + 1;
                    // Take `:: ident` pairs (`::` is two `:` puncts).
                    loop {
                        let colons = matches!(
                            (&trees.get(j), &trees.get(j + 1)),
                            (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
                                if a.as_char() == ':' && b.as_char() == ':'
                        );
                        match (colons, trees.get(j + 2)) {
                            (true, Some(TokenTree::Ident(next))) => {
                                segments.push(next.to_string());
                                j += 3;
                                if segments.last().is_some_and(|s| s != "super") {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                    if segments.len() > 1 {
                        self.record(span, &segments);
                    }
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Refs<'_> {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(first) = path.segments.first() {
            self.record(first.ident.span(), &segments);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }

    fn visit_attribute(&mut self, a: &'ast syn::Attribute) {
        // `#[error("{}", crate::x::f(.0))]`: the arguments are unparsed tokens.
        if let syn::Meta::List(list) = &a.meta {
            self.tokens(list.tokens.clone());
        }
        syn::visit::visit_attribute(self, a);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // An inline `mod x { .. }` is one level deeper for its `super::` paths.
        self.depth += 1;
        syn::visit::visit_item_mod(self, m);
        self.depth -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rel: &str, text: &str) -> Vec<Violation> {
        let macros = BTreeMap::from([("warn_limited".to_string(), "ratelog".to_string())]);
        check_source(rel, Path::new(rel), text, &macros).expect("the test source parses")
    }

    fn pairs(v: &[Violation]) -> Vec<(usize, &str, &str)> {
        v.iter()
            .map(|v| (v.line, v.from.as_str(), v.to.as_str()))
            .collect()
    }

    #[test]
    fn upstream_import_passes() {
        let v = check(
            "detect/state.rs",
            "use crate::events::Record;\nuse crate::policy::{Policy, load::x};\nfn f() { crate::ratelog::g(); crate::warn_limited!(\"k\", \"m\"); }\n",
        );
        assert_eq!(v, vec![]);
    }

    #[test]
    fn downstream_import_fails() {
        let v = check("probes/mod.rs", "\nuse crate::config::Config;\n");
        assert_eq!(pairs(&v), vec![(2, "probes", "config")]);
        assert_eq!(
            v[0].to_string(),
            "probes/mod.rs:2: module probes imports config, which is downstream of it"
        );
    }

    #[test]
    fn grouped_use_is_seen() {
        let v = check(
            "outputs/jsonl.rs",
            "use crate::{\n    events::Record,\n    monitor::{Heartbeat, x},\n    watching::WatchStatus as W,\n};\n",
        );
        assert_eq!(
            pairs(&v),
            vec![(3, "outputs", "monitor"), (4, "outputs", "watching")]
        );
    }

    #[test]
    fn path_in_expression_is_seen() {
        let v = check(
            "identity/mod.rs",
            "fn f() {\n    let _ = crate::config::defaults();\n}\n",
        );
        assert_eq!(pairs(&v), vec![(2, "identity", "config")]);
    }

    #[test]
    fn path_in_type_and_macro_arguments_is_seen() {
        let v = check(
            "events/mod.rs",
            "fn f(_: crate::detect::Alert) {\n    println!(\"{}\", crate::app::NAME);\n}\n",
        );
        assert_eq!(
            pairs(&v),
            vec![(1, "events", "detect"), (2, "events", "app")]
        );
    }

    #[test]
    fn path_in_attribute_arguments_is_seen() {
        let v = check(
            "outputs/grpc/mod.rs",
            "enum E {\n    #[error(\"tls: {}\", crate::preflight::error_chain(.0))]\n    Tls(X),\n}\n",
        );
        assert_eq!(pairs(&v), vec![(2, "outputs", "preflight")]);
    }

    #[test]
    fn super_reaching_the_crate_root_is_seen() {
        // `detect/mod.rs` is at depth 1: `super::` is the crate root. In `detect/state.rs`
        // `super::` is `detect` itself, and an inline `mod tests` adds one more level.
        let v = check("detect/mod.rs", "use super::outputs::Sink;\n");
        assert_eq!(pairs(&v), vec![(1, "detect", "outputs")]);
        let v = check(
            "detect/state.rs",
            "use super::Rule;\nmod tests { use super::super::super::cli::Args; use super::super::x; }\n",
        );
        assert_eq!(pairs(&v), vec![(2, "detect", "cli")]);
    }

    #[test]
    fn own_module_and_crate_root_macros_pass() {
        let v = check(
            "ratelog.rs",
            "use crate::ratelog::X;\nfn f() { crate::warn_limited!(\"k\", \"m\"); }\n",
        );
        assert_eq!(v, vec![]);
    }

    #[test]
    fn unknown_module_fails() {
        let v = check("events/mod.rs", "use crate::nowhere::X;\n");
        assert!(v[0].unknown, "{v:?}");
    }

    #[test]
    fn every_module_has_one_layer() {
        let mut all: Vec<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a module is listed twice");
    }
}
