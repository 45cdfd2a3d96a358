//! The settings tables of `docs/settings.md` are the binaries' own: each is generated
//! from the binary's `--help` (every flag, its environment variable, its default and
//! its description), between markers, and this test fails when a table and the
//! binary disagree. `UPDATE_GOLDEN=1` rewrites the tables from the binaries, for
//! review in the diff, as for the charts' golden renderings. No root needed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One setting, as `--help` describes it.
#[derive(Debug, PartialEq, Eq)]
struct Setting {
    flag: String,
    env: Option<String>,
    default: Option<String>,
    values: Option<String>,
    what: String,
}

/// The value of the first `[key: …]` annotation in `text`, and `text` without it.
fn annotation(text: &str, key: &str) -> (Option<String>, String) {
    let open = format!("[{key}: ");
    let Some(start) = text.find(&open) else {
        return (None, text.to_string());
    };
    // The value may hold brackets itself (`[::]:15020`): the annotation ends at the
    // `]` that closes its own `[`.
    let mut depth = 0usize;
    let close = text[start..].char_indices().find(|(_, c)| {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ => return false,
        }
        depth == 0
    });
    let Some((len, _)) = close else {
        return (None, text.to_string());
    };
    let value = text[start + open.len()..start + len].to_string();
    let rest = format!("{}{}", &text[..start], &text[start + len + 1..]);
    (Some(value), rest)
}

/// The options of a `--help` text (the `Options:` section), in order.
fn parse(help: &str) -> Vec<Setting> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    let mut in_options = false;
    let finish = |entry: Option<(String, String)>, out: &mut Vec<Setting>| {
        let Some((flag, text)) = entry else { return };
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let (env, text) = annotation(&text, "env");
        let (default, text) = annotation(&text, "default");
        let (values, text) = annotation(&text, "possible values");
        out.push(Setting {
            flag,
            env: env.map(|e| e.trim_end_matches('=').to_string()),
            default,
            values,
            what: text.trim().to_string(),
        });
    };
    for line in help.lines() {
        if line.starts_with("Options:") {
            in_options = true;
            continue;
        }
        if !in_options {
            continue;
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with("-") && line.starts_with("  ") && !line.starts_with("          ") {
            finish(current.take(), &mut out);
            let flag = trimmed
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .unwrap_or(trimmed)
                .trim_end_matches(',')
                .to_string();
            current = Some((flag, String::new()));
        } else if let Some((_, text)) = current.as_mut() {
            text.push(' ');
            text.push_str(trimmed);
        }
    }
    finish(current, &mut out);
    out.retain(|s| s.flag != "--help" && s.flag != "--version");
    out
}

/// A Markdown table of `settings`.
fn table(settings: &[Setting]) -> String {
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = String::from("| variable | flag | default | what |\n|---|---|---|---|\n");
    for s in settings {
        let env = s.env.as_deref().map_or("".into(), |e| format!("`{e}`"));
        let mut default = s
            .default
            .as_deref()
            .map_or("".into(), |d| format!("`{}`", cell(d)));
        if let Some(v) = &s.values {
            default.push_str(&format!(" ({})", cell(v)));
        }
        out.push_str(&format!(
            "| {env} | `{}` | {default} | {} |\n",
            s.flag,
            cell(&s.what)
        ));
    }
    out
}

fn help(binary: &str) -> String {
    // A clean environment: `--help` shows a variable's value when it is set.
    let out = Command::new(e2e::bin_path(binary))
        .env_clear()
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{binary} --help: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn doc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/settings.md")
}

/// `text` with the part between `<!-- begin: <name> -->` and `<!-- end: <name> -->`
/// replaced by `body`; `None` when the markers are missing.
fn replace_between(text: &str, name: &str, body: &str) -> Option<String> {
    let begin = format!("<!-- begin: {name} -->\n");
    let end = format!("<!-- end: {name} -->");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    Some(format!("{}{body}{}", &text[..start], &text[stop..]))
}

#[test]
fn the_settings_tables_are_the_binaries_own() {
    let path = doc();
    let text = std::fs::read_to_string(&path).expect("docs/settings.md");
    let mut want = text.clone();
    for binary in ["ztunnel", "istio-cni"] {
        let settings = parse(&help(binary));
        assert!(settings.len() > 10, "{binary}: {settings:?}");
        let marker = format!("{binary} --help");
        want = replace_between(&want, &marker, &table(&settings))
            .unwrap_or_else(|| panic!("docs/settings.md has no <!-- begin: {marker} --> markers"));
    }
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &want).expect("write docs/settings.md");
        return;
    }
    assert!(
        want == text,
        "docs/settings.md is not what the binaries' --help say: run UPDATE_GOLDEN=1 cargo test -p charts --test settings and review the diff"
    );
}

#[test]
fn help_is_parsed_into_flag_variable_default_and_meaning() {
    let help = "Usage: x\n\nOptions:\n      --inpod-uds <INPOD_UDS>\n          Socket of the node agent [env: INPOD_UDS=] [default: /var/run/z.sock]\n      --stats-addr <STATS_ADDR>\n          Metrics [env: STATS_ADDR=] [default: [::]:15020]\n      --ipv6 <IPV6>\n          Dual-stack | on\n          listeners [env: IPV6=] [default: true] [possible values: true, false]\n  -h, --help\n          Print help\n";
    let s = parse(help);
    let got: Vec<[Option<&str>; 5]> = s
        .iter()
        .map(|x| {
            [
                Some(x.flag.as_str()),
                x.env.as_deref(),
                x.default.as_deref(),
                x.values.as_deref(),
                Some(x.what.as_str()),
            ]
        })
        .collect();
    let want = [
        [
            "--inpod-uds",
            "INPOD_UDS",
            "/var/run/z.sock",
            "",
            "Socket of the node agent",
        ],
        ["--stats-addr", "STATS_ADDR", "[::]:15020", "", "Metrics"],
        [
            "--ipv6",
            "IPV6",
            "true",
            "true, false",
            "Dual-stack | on listeners",
        ],
    ]
    .map(|row| row.map(|v| Some(v).filter(|v| !v.is_empty())));
    assert_eq!(got, want);
    assert!(table(&s)
        .contains("| `IPV6` | `--ipv6` | `true` (true, false) | Dual-stack \\| on listeners |"));
}
