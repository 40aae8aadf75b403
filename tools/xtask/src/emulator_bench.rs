//! Benchmark scenarios in Bochs, where RDTSC counts executed instructions: the figures are
//! emulated cycles, repeatable from run to run. Each scenario prints `NAME: VALUE cycles` (or
//! another unit, such as the shadow faults of `nested-bench`).

use crate::bench::Figure;
use crate::emulator::{self, Verdict};
use crate::{Emulator, RunSpec, step};

/// A figure a scenario prints: the line prefix, the name in the table, and its target.
struct Metric {
    prefix: &'static str,
    name: &'static str,
    /// Upper bound (in `unit`), if the figure has a target.
    at_most: Option<f64>,
    /// What the figure counts.
    unit: &'static str,
}

/// The unit of most figures.
const CYCLES: &str = "emulated cycles";

struct BenchScenario {
    scenario: &'static str,
    cpus: u32,
    metrics: &'static [Metric],
}

const SCENARIOS: &[BenchScenario] = &[
    BenchScenario {
        scenario: "ipc-bench",
        cpus: 1,
        metrics: &[
            Metric {
                prefix: "null system call round trip: ",
                name: "ipc-bench: null system call (CurrentCpu) round trip",
                at_most: None,
                unit: CYCLES,
            },
            Metric {
                prefix: "ipc round trip: ",
                name: "ipc-bench: call+reply, two PDs, one CPU (median)",
                at_most: Some(1000.0),
                unit: CYCLES,
            },
            Metric {
                prefix: "ipc round trip (same domain): ",
                name: "ipc-bench: call+reply, one PD, one CPU (median)",
                at_most: None,
                unit: CYCLES,
            },
        ],
    },
    BenchScenario {
        scenario: "vmexit-bench",
        cpus: 1,
        metrics: &[
            Metric {
                prefix: "vmexit cpuid: ",
                name: "vmexit-bench: CPUID exit through the user-level VMM (median)",
                at_most: Some(2500.0),
                unit: CYCLES,
            },
            Metric {
                prefix: "vmexit cpuid vmm share: ",
                name: "vmexit-bench: CPUID exit, VMM's share",
                at_most: None,
                unit: CYCLES,
            },
            Metric {
                prefix: "vmexit cpuid kernel share: ",
                name: "vmexit-bench: CPUID exit, kernel's share",
                at_most: None,
                unit: CYCLES,
            },
            Metric {
                prefix: "vmexit ept fault: ",
                name: "vmexit-bench: EPT-violation demand fault (median)",
                at_most: Some(4000.0),
                unit: CYCLES,
            },
            Metric {
                prefix: "vmexit ept fault vmm share: ",
                name: "vmexit-bench: demand fault, VMM's share (with EptMap)",
                at_most: None,
                unit: CYCLES,
            },
            Metric {
                prefix: "vmexit ept fault kernel share: ",
                name: "vmexit-bench: demand fault, kernel's share",
                at_most: None,
                unit: CYCLES,
            },
        ],
    },
    BenchScenario {
        scenario: "nested-bench",
        cpus: 1,
        metrics: &[
            Metric {
                prefix: "nested ept fixed in vept: ",
                name: "nested-bench: L2 EPT violation fixed in the vEPT (median)",
                at_most: Some(4000.0),
                unit: CYCLES,
            },
            Metric {
                prefix: "nested ept reflected to l1: ",
                name: "nested-bench: L2 EPT violation reflected to L1, L1 maps (median)",
                at_most: Some(18000.0),
                unit: CYCLES,
            },
            Metric {
                prefix: "nested ept reflected to l1 with invept: ",
                name: "nested-bench: the same with INVEPT from L1 (median)",
                at_most: None,
                unit: CYCLES,
            },
            Metric {
                prefix: "nested cpuid reflected to l1: ",
                name: "nested-bench: L2 CPUID reflected to L1 and back (median)",
                at_most: Some(12000.0),
                unit: CYCLES,
            },
            Metric {
                prefix: "nested 2m shadow faults for 64 MiB: ",
                name: "nested-bench: shadow faults, 64 MiB in 2 MiB pages at both levels",
                at_most: Some(64.0),
                unit: "shadow faults",
            },
        ],
    },
];

/// Parses the number after `prefix` on a console line ("... 412 cycles").
fn value_after(line: &str, prefix: &str) -> Option<f64> {
    let at = line.find(prefix)? + prefix.len();
    line[at..].split_whitespace().next()?.parse().ok()
}

pub fn run() -> Result<Vec<Figure>, String> {
    let mut figures = Vec::new();
    for b in SCENARIOS {
        let mut spec = RunSpec {
            scenario: b.scenario.into(),
            emulator: Emulator::Bochs,
            cpus: b.cpus,
            uefi: false,
            timeout_secs: 0,
            kernel_args: Vec::new(),
            stream: false,
        };
        spec.timeout_secs = emulator::default_timeout(&spec);
        step!("benchmark scenario {} on Bochs", b.scenario);
        let outcome = emulator::run(&spec)?;
        if outcome.verdict != Verdict::Pass {
            return Err(format!(
                "benchmark scenario {} did not pass: {:?} (log {})",
                b.scenario,
                outcome.verdict,
                outcome.log.display()
            ));
        }
        for m in b.metrics {
            let value = outcome
                .lines
                .iter()
                .find_map(|l| value_after(l, m.prefix))
                .ok_or_else(|| format!("{} printed no '{}' line", b.scenario, m.prefix.trim()))?;
            figures.push(Figure {
                name: m.name.into(),
                value,
                unit: m.unit.into(),
                target: m.at_most.map(|t| format!("<= {t}")).unwrap_or_default(),
                ok: m.at_most.is_none_or(|t| value <= t),
            });
        }
    }
    Ok(figures)
}
