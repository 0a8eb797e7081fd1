//! Drives `retort::world::train::train_world` until `retort world train` is wired into the CLI:
//! `cargo run --release -p retort --example world_train -- [--out DIR] [--seed S]
//! [--teacher-steps N] [--student-steps N] [--batch-size B] [--only teacher|student]
//! [--eval-per-level N] [--threads N]`. Progress goes to stderr, the summary JSON to stdout.

use std::path::PathBuf;
use std::time::Instant;

use retort::world::train::{WorldEvent, WorldModel, WorldTrainOptions, train_world};

fn value<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i + 1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("error: `{}` needs a value", args[i]);
            std::process::exit(2)
        })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut options = WorldTrainOptions::new(
        PathBuf::from("assets/world"),
        retort::world::train::DEFAULT_SEED,
    );
    let mut log_every = 20usize;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--out" => options.out = PathBuf::from(value::<String>(&args, i)),
            "--seed" => {
                let seed: u64 = value(&args, i);
                let fresh = WorldTrainOptions::new(options.out.clone(), seed);
                options.seed = seed;
                options.teacher.seed = fresh.teacher.seed;
                options.student.seed = fresh.student.seed;
            }
            "--teacher-steps" => options.teacher.steps = value(&args, i),
            "--student-steps" => options.student.steps = value(&args, i),
            "--teacher-lr" => options.teacher.lr = value(&args, i),
            "--student-lr" => options.student.lr = value(&args, i),
            "--batch-size" => {
                options.teacher.batch_size = value(&args, i);
                options.student.batch_size = options.teacher.batch_size;
            }
            "--train-per-level" => options.train_per_level = value(&args, i),
            "--eval-per-level" => options.eval_per_level = value(&args, i),
            "--log-every" => log_every = value(&args, i),
            "--threads" => retort::world::train::set_threads(value(&args, i))?,
            "--only" => {
                options.models = match value::<String>(&args, i).as_str() {
                    "teacher" => vec![WorldModel::Teacher],
                    "student" => vec![WorldModel::Student],
                    other => {
                        return Err(format!(
                            "--only: expected `teacher` or `student`, got `{other}`"
                        )
                        .into());
                    }
                }
            }
            other => return Err(format!("unknown argument `{other}`").into()),
        }
        i += 2;
    }
    let start = Instant::now();
    let summary = train_world(&options, &mut |event| match event {
        WorldEvent::Stage(name) => eprintln!("[{:7.1}s] {name}", start.elapsed().as_secs_f64()),
        WorldEvent::Step(model, stats, tokens, seconds) => {
            if stats.step % log_every == 0 || stats.step == 1 {
                eprintln!(
                    "[{:7.1}s] {} step {} loss {:.4} lr {:.2e} grad {:.3} tokens/s {:.0}",
                    start.elapsed().as_secs_f64(),
                    model.name(),
                    stats.step,
                    stats.loss,
                    stats.lr,
                    stats.grad_norm,
                    tokens as f64 / seconds.max(1e-9)
                );
            }
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
