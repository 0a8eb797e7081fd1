//! `retort bench`: throughput figures on the fixed bench configs, one JSON line on stdout shaped
//! like `shared/bench/torch_bench.py`'s output; progress on stderr.

use std::process::ExitCode;

use anyhow::Context;
use retort::bench::{BenchOptions, LONG_CHILD_ENV, compare, parse_dtypes, run as run_bench};

/// `retort bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Only these figures (comma separated: train, lora, lora_bf16, score, generate, generate_b1,
    /// generate_b8, generate_many, kd, verify; and, never by default, long, long_train,
    /// long_score: one 8k-token sequence with a 151,936-entry vocabulary, each run in a child
    /// process that reports its peak memory).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Only these configs (bench-tiny, bench-small; bench-0.5b, a Qwen2.5-0.5B shape for a GPU,
    /// only when named).
    #[arg(long, value_delimiter = ',')]
    pub config: Vec<String>,
    /// Seconds per figure (longer is steadier).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Dtypes of `score` and the generation figures (f32, bf16, f16), each run in turn on the
    /// same weights: on the CPU the linear weights' storage (compute in f32), on a GPU the whole
    /// model. `--dtype f32,bf16` puts `generate_b1_bf16` beside `generate_b1`, with its `vs_f32`
    /// ratio. One non-f32 dtype alone also makes the training figure autocast in it.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub dtype: Vec<String>,
    /// Where the models run: `cpu`, `cuda` or `cuda:N` (a CUDA build).
    #[arg(
        long,
        env = "RETORT_DEVICE",
        default_value = "cpu",
        value_name = "DEVICE"
    )]
    pub device: retort::compute::DeviceChoice,
    /// A reference run to compare with (`torch_bench.py`'s JSON output from the same machine):
    /// prints each figure's ratio and adds them to the JSON as `compare`.
    #[arg(long, value_name = "JSON")]
    pub compare: Option<std::path::PathBuf>,
}

/// Runs the selected figures and prints the report.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let mut options = BenchOptions::from_filters(&args.only, &args.config, args.seconds)?;
    // The `long` figures run in a child process of this binary (their peak memory is their own),
    // unless this is that child.
    if std::env::var_os(LONG_CHILD_ENV).is_none() {
        options.long_child = std::env::current_exe().ok();
    }
    options.set_dtypes(parse_dtypes(&args.dtype)?);
    options.device = args.device;
    // Read the reference first: a bad path should fail before minutes of benchmarking.
    let reference = match &args.compare {
        Some(path) => {
            let text = fs_err::read_to_string(path)?;
            let value: serde_json::Value =
                serde_json::from_str(text.trim()).with_context(|| {
                    format!(
                        "{}: expected the JSON line printed by torch_bench.py",
                        path.display()
                    )
                })?;
            Some((path, value))
        }
        None => None,
    };
    let mut report =
        run_bench(&options, &mut |line| eprintln!("{line}")).context("bench failed")?;
    if let Some((path, reference)) = reference {
        let rows = compare(&report, &reference);
        let table: Vec<(&str, String)> = rows
            .iter()
            .map(|r| {
                (
                    r.figure.as_str(),
                    format!(
                        "{:>9.0} vs {:>9.0} tokens/s   {:>5.2}x",
                        r.ours, r.reference, r.ratio
                    ),
                )
            })
            .collect();
        crate::ui::table(
            &format!("retort vs {} (ratio > 1: retort is faster)", path.display()),
            &table,
        );
        if let Some(map) = report.as_object_mut() {
            map.insert("compare".into(), serde_json::to_value(&rows)?);
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}
