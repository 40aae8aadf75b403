//! `cargo xtask bench`: host benchmarks (the shadow-EPT engine over its in-memory backend) and
//! benchmark scenarios in Bochs (emulated cycles); prints a table and writes build/bench.json.

use crate::{build_dir, root, step};
use std::process::Command;

/// One measured figure.
#[derive(Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// e.g. "<= 1000"; empty when there is no target.
    pub target: String,
    pub ok: bool,
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn to_json(figures: &[Figure]) -> String {
    let rows: Vec<String> = figures
        .iter()
        .map(|f| {
            format!(
                "  {{\"name\": \"{}\", \"value\": {}, \"unit\": \"{}\", \"target\": \"{}\", \"ok\": {}}}",
                json_escape(&f.name),
                f.value,
                json_escape(&f.unit),
                json_escape(&f.target),
                f.ok
            )
        })
        .collect();
    format!("[\n{}\n]\n", rows.join(",\n"))
}

/// Reads the flat JSON array the host benchmark writes (objects with string, number and
/// boolean fields, one per figure). Small and strict: anything else is an error.
fn parse_json(text: &str) -> Result<Vec<Figure>, String> {
    let mut out = Vec::new();
    for obj in text.split('{').skip(1) {
        let body = obj.split('}').next().unwrap_or("");
        let field = |key: &str| -> Option<String> {
            let k = format!("\"{key}\"");
            let at = body.find(&k)? + k.len();
            let rest = body[at..].trim_start().strip_prefix(':')?.trim_start();
            if let Some(s) = rest.strip_prefix('"') {
                Some(s[..s.find('"')?].to_string())
            } else {
                let end = rest.find([',', '\n']).unwrap_or(rest.len());
                Some(rest[..end].trim().to_string())
            }
        };
        let name = field("name").ok_or("benchmark JSON: a figure without a name")?;
        let value: f64 = field("value")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("benchmark JSON: {name} has no numeric value"))?;
        out.push(Figure {
            name,
            value,
            unit: field("unit").unwrap_or_default(),
            target: field("target").unwrap_or_default(),
            ok: field("ok").map(|v| v == "true").unwrap_or(false),
        });
    }
    Ok(out)
}

fn host_benchmarks(quick: bool) -> Result<Vec<Figure>, String> {
    let json = build_dir().join("bench-ept.json");
    std::fs::create_dir_all(build_dir()).map_err(|e| e.to_string())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    step!("host benchmark: shadow-EPT engine (in-memory backend, release)");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root())
        .args([
            "run",
            "--release",
            "--locked",
            "-p",
            "ept",
            "--example",
            "vept_bench",
            "--",
        ])
        .arg("--json")
        .arg(&json);
    if quick {
        cmd.arg("--quick");
    }
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    let text = std::fs::read_to_string(&json)
        .map_err(|e| format!("the host benchmark wrote no {}: {e}", json.display()))?;
    let figures = parse_json(&text)?;
    if !status.success() && figures.iter().all(|f| f.ok) {
        return Err("the host benchmark failed".into());
    }
    Ok(figures)
}

pub fn run(args: &[String]) -> Result<u8, String> {
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(a) = args.iter().find(|a| *a != "--quick") {
        return Err(format!("unknown option '{a}' (bench takes --quick)"));
    }
    let mut figures = host_benchmarks(quick)?;
    figures.extend(crate::emulator_bench::run()?);

    println!(
        "\n{:<58} {:>16} {:<14} {:<14} ok",
        "benchmark", "value", "unit", "target"
    );
    for f in &figures {
        println!(
            "{:<58} {:>16} {:<14} {:<14} {}",
            f.name,
            if f.value.fract() == 0.0 {
                format!("{}", f.value)
            } else {
                format!("{:.2}", f.value)
            },
            f.unit,
            f.target,
            if f.target.is_empty() {
                "-"
            } else if f.ok {
                "yes"
            } else {
                "NO"
            }
        );
    }
    let path = build_dir().join("bench.json");
    std::fs::write(&path, to_json(&figures)).map_err(|e| e.to_string())?;
    println!("written to {}", path.display());
    Ok(if figures.iter().all(|f| f.ok || f.target.is_empty()) {
        0
    } else {
        1
    })
}
