//! Differential test of the interpreter against the host CPU (issue 4).
//!
//! Random sequences of user-level integer, string and SSE/SSE2 instructions run from the
//! same initial registers and memory on the host (in a forked child, see
//! `support::native`) and on `emu::exec::{integer, sse}`; general-purpose registers, the
//! defined arithmetic flags, DF, MXCSR, XMM registers, the data buffer, the end RIP and any
//! exception must match.
//!
//! Knobs (environment variables):
//! - `EMU_DIFF_CASES`: number of cases (default 20000),
//! - `EMU_DIFF_SEED`: PRNG seed (default fixed),
//! - `EMU_DIFF_LEN`: maximum generated instructions per case (default 8),
//! - `EMU_DIFF_ONLY`: comma-separated mnemonics to restrict the generator to (e.g.
//!   `rcl,rcr,shld` or `movs,cmps` for string instructions),
//! - `EMU_DIFF_REPORTS`: how many failing cases to print in detail (default 12),
//! - `EMU_DIFF_UNMASKED`: percentage of cases that start with one SSE exception unmasked
//!   in MXCSR (default 3; 0 leaves #XM out).

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use emu::exception::Exception;
use emu::state::{CpuState, DF, STATUS_FLAGS};
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

use support::gen::{self, Case, Rng, Tables};
use support::interp::{self, Outcome};
use support::native::{self, Context, Job, NativeResult, Status};

const DEFAULT_CASES: usize = 20_000;
const DEFAULT_SEED: u64 = 0x0e3a_d1ff_2024_0004;
const DEFAULT_LEN: u64 = 8;
const BATCH: usize = 512;
/// Cases generated, run and compared at a time.
const CHUNK: usize = 4096;
/// Mismatching cases whose first divergent instruction is searched for.
const MAX_ANALYSED: usize = 200;

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = if let Some(hex) = v.strip_prefix("0x") {
                u64::from_str_radix(hex, 16)
            } else {
                v.parse()
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        }
        Err(_) => default,
    }
}

/// A generated case, encoded and decoded back.
struct Prepared {
    case: Case,
    bytes: Vec<u8>,
    /// Offsets of the instructions in `bytes`.
    offsets: Vec<usize>,
    decoded: Vec<Instruction>,
}

fn prepare(case: Case) -> Prepared {
    let ip = native::seq_addr();
    let (bytes, offsets) = gen::encode(&case.instrs, ip);
    let decoded: Vec<Instruction> = Decoder::with_ip(64, &bytes, ip, DecoderOptions::NONE)
        .into_iter()
        .collect();
    assert_eq!(
        decoded.len(),
        case.instrs.len(),
        "the sequence does not decode back to as many instructions"
    );
    Prepared {
        case,
        bytes,
        offsets,
        decoded,
    }
}

fn job(p: &Prepared, prefix: usize) -> Job {
    let init = &p.case.init;
    let end = p.offsets.get(prefix).copied().unwrap_or(p.bytes.len());
    let mut ctx = Context::default();
    ctx.gpr = init.gpr;
    ctx.rflags = init.rflags | 0x202;
    ctx.mxcsr = init.mxcsr;
    ctx.xmm = init.xmm;
    Job {
        seq: p.bytes[..end].to_vec(),
        ctx,
        data: init.data.clone(),
    }
}

fn run_native(jobs: &[Job]) -> Vec<native::Results> {
    jobs.chunks(BATCH).map(native::run).collect()
}

fn native_result(results: &[native::Results], i: usize) -> &NativeResult {
    results[i / BATCH].get(i % BATCH)
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

fn flag_names(f: u64) -> String {
    let names = [
        (0, "CF"),
        (2, "PF"),
        (4, "AF"),
        (6, "ZF"),
        (7, "SF"),
        (10, "DF"),
        (11, "OF"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| f & (1 << b) != 0)
        .map(|(_, n)| *n)
        .collect();
    format!("{:#x}[{}]", f, v.join(" "))
}

/// Differences between the host's result and the interpreter's, as readable lines.
#[allow(clippy::too_many_arguments)]
fn compare(
    native: &NativeResult,
    state: &CpuState,
    data: &[u8],
    fault: Option<(usize, Exception)>,
    undefined_flags: u64,
    end_rip: u64,
    ips: &[u64],
) -> Vec<String> {
    let mut d = Vec::new();
    let index_of = |rip: u64| ips.iter().position(|&ip| ip == rip);
    match (native.status(), fault) {
        (Status::Completed, None) => {
            if state.rip != end_rip {
                d.push(format!(
                    "rip: host ended at {end_rip:#x}, interpreter at {:#x}",
                    state.rip
                ));
            }
        }
        (Status::Faulted, Some((i, e))) => {
            if u64::from(e.vector()) != native.trapno || index_of(native.fault_rip) != Some(i) {
                d.push(format!(
                    "exception: host vector {} at #{:?}, interpreter {e:?} (vector {}) at #{i}",
                    native.trapno,
                    index_of(native.fault_rip),
                    e.vector()
                ));
            }
        }
        (Status::Faulted, None) => d.push(format!(
            "exception: host raised vector {} at #{:?} (rip {:#x}), interpreter completed",
            native.trapno,
            index_of(native.fault_rip),
            native.fault_rip
        )),
        (Status::Completed, Some((i, e))) => {
            d.push(format!(
                "exception: interpreter raised {e:?} at #{i}, host completed"
            ));
        }
        (s, _) => {
            d.push(format!(
                "host run failed: {s:?} (signal/code {})",
                native.trapno
            ));
            return d;
        }
    }
    let ctx = &native.ctx;
    for (i, name) in GPR_NAMES.iter().enumerate() {
        if i != 4 && ctx.gpr[i] != state.gpr[i] {
            d.push(format!(
                "{name}: host {:#018x}, interpreter {:#018x}",
                ctx.gpr[i], state.gpr[i]
            ));
        }
    }
    let mask = (STATUS_FLAGS & !undefined_flags) | DF;
    if (ctx.rflags ^ state.rflags) & mask != 0 {
        d.push(format!(
            "rflags (compared {}): host {}, interpreter {}",
            flag_names(mask),
            flag_names(ctx.rflags & mask),
            flag_names(state.rflags & mask)
        ));
    }
    if ctx.mxcsr != state.mxcsr {
        d.push(format!(
            "mxcsr: host {:#x}, interpreter {:#x}",
            ctx.mxcsr, state.mxcsr
        ));
    }
    for i in 0..16 {
        if ctx.xmm[i] != state.xmm[i] {
            d.push(format!(
                "xmm{i}: host {:#034x}, interpreter {:#034x}",
                ctx.xmm[i], state.xmm[i]
            ));
        }
    }
    let mut at = 0;
    let mut shown = 0;
    while at < data.len() {
        if native.data[at] == data[at] {
            at += 1;
            continue;
        }
        let start = at;
        while at < data.len() && native.data[at] != data[at] && at - start < 32 {
            at += 1;
        }
        if shown < 6 {
            d.push(format!(
                "memory [{:#x}..{:#x}] (r15{:+#x}): host {:02x?}, interpreter {:02x?}",
                native::DATA_ADDR + start as u64,
                native::DATA_ADDR + at as u64,
                start as i64 - 0x800,
                &native.data[start..at],
                &data[start..at]
            ));
        }
        shown += 1;
    }
    if shown > 6 {
        d.push(format!("... {} more differing memory ranges", shown - 6));
    }
    d
}

fn disassemble(p: &Prepared, mark: Option<usize>) -> String {
    let mut f = IntelFormatter::new();
    f.options_mut().set_hex_prefix("0x");
    f.options_mut().set_hex_suffix("");
    let mut s = String::new();
    for (i, instr) in p.decoded.iter().enumerate() {
        let mut text = String::new();
        f.format(instr, &mut text);
        let start = p.offsets[i];
        let bytes = &p.bytes[start..start + instr.len()];
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let arrow = if mark == Some(i) { "=>" } else { "  " };
        let _ = writeln!(s, "  {arrow} #{i:<2} {:#x}: {hex:<30} {text}", instr.ip());
    }
    s
}

fn describe_init(p: &Prepared) -> String {
    let init = &p.case.init;
    let mut s = String::new();
    for (i, name) in GPR_NAMES.iter().enumerate() {
        if i == 4 {
            continue;
        }
        let _ = write!(s, "  {name}={:#x}", init.gpr[i]);
        if i % 4 == 3 {
            s.push('\n');
        }
    }
    let _ = writeln!(
        s,
        "  rflags={}  mxcsr={:#x}",
        flag_names(init.rflags),
        init.mxcsr
    );
    for (i, x) in init.xmm.iter().enumerate() {
        let _ = write!(s, "  xmm{i}={x:#034x}");
        if i % 2 == 1 {
            s.push('\n');
        }
    }
    s
}

/// Finds the first instruction after which the host and the interpreter disagree, by
/// running every prefix of the sequence on the host.
fn first_divergence(p: &Prepared, outcome: &Outcome) -> Option<(usize, Vec<String>)> {
    let n = p.decoded.len();
    let jobs: Vec<Job> = (1..=n).map(|k| job(p, k)).collect();
    let results = run_native(&jobs);
    let ips: Vec<u64> = p.decoded.iter().map(|i| i.ip()).collect();
    for k in 0..n {
        let nat = native_result(&results, k);
        let end_rip = p.decoded[k].next_ip();
        let diffs = match outcome.steps.get(k) {
            Some(snap) => compare(
                nat,
                &snap.state,
                &snap.data,
                None,
                snap.undefined_flags,
                end_rip,
                &ips,
            ),
            // The interpreter stopped at instruction k (fault or unimplemented).
            None => compare(
                nat,
                &outcome.state,
                &outcome.data,
                outcome.fault,
                outcome.undefined_flags,
                end_rip,
                &ips,
            ),
        };
        if !diffs.is_empty() {
            return Some((k, diffs));
        }
    }
    None
}

#[test]
fn interpreter_matches_host_cpu() {
    let cases = env_num("EMU_DIFF_CASES", DEFAULT_CASES as u64) as usize;
    let seed = env_num("EMU_DIFF_SEED", DEFAULT_SEED);
    let max_len = env_num("EMU_DIFF_LEN", DEFAULT_LEN).max(1);
    let reports = env_num("EMU_DIFF_REPORTS", 12) as usize;
    let unmasked = env_num("EMU_DIFF_UNMASKED", 3);
    let only: Vec<String> = std::env::var("EMU_DIFF_ONLY")
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();

    let tables = Tables::new(&only);
    assert!(
        !tables.forms.is_empty() || tables.strings,
        "EMU_DIFF_ONLY={only:?} selects no instruction"
    );
    eprintln!(
        "differential: seed {seed:#x}, {cases} cases, {} forms of {} mnemonics (+ string ops: {}); {} forms not encodable in 64-bit mode skipped",
        tables.forms.len(),
        tables.mnemonic_count(),
        tables.strings,
        tables.dropped.len()
    );

    let mut rng = Rng::new(seed);
    // Failing cases are kept (with their interpreter outcome and differences); the rest
    // is dropped chunk by chunk to keep memory and fork costs low.
    let mut failures: Vec<(Prepared, Outcome, Vec<String>)> = Vec::new();
    let mut unimplemented: BTreeMap<String, usize> = BTreeMap::new();
    let mut host_faults = 0usize;
    let mut instructions = 0usize;
    let mut failing = 0usize;
    let mut done = 0usize;
    let mut compiled_cases = 0usize;
    while done < cases {
        let n = CHUNK.min(cases - done);
        done += n;
        let prepared: Vec<Prepared> = (0..n)
            .map(|_| prepare(gen::random_case(&mut rng, &tables, max_len, unmasked)))
            .collect();
        let jobs: Vec<Job> = prepared.iter().map(|p| job(p, p.decoded.len())).collect();
        let results = run_native(&jobs);
        drop(jobs);
        for (i, p) in prepared.into_iter().enumerate() {
            instructions += p.decoded.len();
            let nat = native_result(&results, i);
            if nat.status() == Status::Faulted {
                host_faults += 1;
            }
            let outcome = interp::run(&p.case.init, &p.decoded, false);
            if let Some((_, m)) = &outcome.unimplemented {
                *unimplemented.entry(m.clone()).or_default() += 1;
                failing += 1;
                continue;
            }
            let ips: Vec<u64> = p.decoded.iter().map(|i| i.ip()).collect();
            let end = p.decoded.last().map_or(0, |l| l.next_ip());
            let diffs = compare(
                nat,
                &outcome.state,
                &outcome.data,
                outcome.fault,
                outcome.undefined_flags,
                end,
                &ips,
            );
            // The same sequence through the block compiler, against the same host run.
            let compiled = interp::run_compiled(&p.case.init, &p.decoded)
                .map(|(s, data, f)| compare(nat, &s, &data, f, outcome.undefined_flags, end, &ips));
            compiled_cases += usize::from(compiled.is_some());
            if let Some(d) = compiled.filter(|d| !d.is_empty()) {
                failing += 1;
                if failures.len() < MAX_ANALYSED {
                    let d = d
                        .into_iter()
                        .map(|l| format!("compiled code: {l}"))
                        .collect();
                    failures.push((p, outcome, d));
                }
            } else if !diffs.is_empty() {
                failing += 1;
                if failures.len() < MAX_ANALYSED {
                    failures.push((p, outcome, diffs));
                }
            }
        }
    }
    eprintln!(
        "differential: {instructions} instructions in {cases} cases, {host_faults} cases ended in an exception on the host, {compiled_cases} cases also run as compiled code, {failing} failing"
    );
    // Straight-line sequences are most of the cases: the compiler must have seen them.
    assert!(
        !only.is_empty() || compiled_cases * 4 >= cases,
        "only {compiled_cases} of {cases} cases ran as compiled code"
    );
    if failing == 0 {
        return;
    }

    // Locate the culprit instruction of each mismatch (unimplemented ones are known).
    let mut by_culprit: BTreeMap<String, usize> = BTreeMap::new();
    let mut text = String::new();
    let mut detailed = 0;
    for (p, _, diffs) in &failures {
        let full = interp::run(&p.case.init, &p.decoded, true);
        let (culprit, step_diffs) = match first_divergence(p, &full) {
            Some((k, d)) => (Some(k), d),
            None => (None, diffs.clone()),
        };
        let key = match culprit {
            Some(k) => {
                let mut f = IntelFormatter::new();
                let mut s = String::new();
                f.format(&p.decoded[k], &mut s);
                let form = s.split_whitespace().next().unwrap_or("").to_string();
                format!("{form} ({:?})", p.decoded[k].code())
            }
            None => "unknown (no single prefix diverges)".to_string(),
        };
        *by_culprit.entry(key).or_default() += 1;
        if detailed < reports {
            detailed += 1;
            let _ = writeln!(text, "\n=== failing case (seed {seed:#x}) ===");
            let _ = writeln!(text, "initial state:\n{}", describe_init(p));
            let _ = writeln!(
                text,
                "sequence (=> first divergent instruction):\n{}",
                disassemble(p, culprit)
            );
            let _ = writeln!(text, "after the divergent instruction:");
            for d in &step_diffs {
                let _ = writeln!(text, "  {d}");
            }
            if culprit.is_some() && culprit != Some(p.decoded.len() - 1) {
                let _ = writeln!(text, "at the end of the sequence:");
                for d in diffs {
                    let _ = writeln!(text, "  {d}");
                }
            }
        }
    }
    let mut summary = String::new();
    if !unimplemented.is_empty() {
        let _ = writeln!(
            summary,
            "unimplemented (neither exec::integer nor exec::sse handles them; cases affected): {unimplemented:?}"
        );
    }
    if !by_culprit.is_empty() {
        let _ = writeln!(
            summary,
            "mismatches by first divergent instruction form (first {} mismatching cases):",
            failures.len()
        );
        for (k, n) in &by_culprit {
            let _ = writeln!(summary, "  {n:5}  {k}");
        }
    }
    eprintln!("{text}\n{summary}");
    panic!(
        "{failing} of {cases} cases differ from the host CPU (seed {seed:#x}); see the report above\n{summary}"
    );
}
