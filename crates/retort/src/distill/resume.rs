//! Where a run starts: [`ResumePoint`] finds the checkpoint to continue from (or refuses an
//! output that already holds one without `--resume`), restores the optimizer and checks that the
//! data would be read in the same order; [`open_metrics`] keeps `metrics.jsonl` consistent with it.

use std::path::{Path, PathBuf};

use retort_model::train::Trainer;
use serde_json::Value;

use crate::distill::checkpoint::{self, OPTIMIZER_FILE, TRAINER_STATE_FILE, TrainerState};
use crate::distill::config::DistillOptions;
use crate::error::{Error, Result};
use crate::io::{AtomicFile, Journal};

/// File name of the per-step metrics journal in the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// A checkpoint a run continues from.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    /// Optimizer steps the checkpoint holds.
    pub step: usize,
    /// The `checkpoint-N` folder.
    pub dir: PathBuf,
}

impl ResumePoint {
    /// The checkpoint to resume in `output`: the latest one with `resume`, none for a fresh
    /// output, and an error when `output` holds checkpoints but `resume` is off.
    pub fn find(output: &Path, resume: bool) -> Result<Option<Self>> {
        let latest = checkpoint::latest_checkpoint(output)?;
        match (latest, resume) {
            (Some((step, dir)), true) => Ok(Some(Self { step, dir })),
            (None, true) => {
                tracing::warn!(
                    "no checkpoint in `{}`: starting from the beginning",
                    output.display()
                );
                Ok(None)
            }
            (Some((step, _)), false) => Err(Error::Invalid(format!(
                "`{}` already holds checkpoints (latest: step {step})\nhint: pass `--resume` to \
                 continue that run, or choose another output folder",
                output.display()
            ))),
            (None, false) => Ok(None),
        }
    }

    /// Restores the optimizer state into `trainer` and returns the saved trainer state, after
    /// checking that the data gives the same batches and warning when the options changed.
    pub fn restore(
        &self,
        trainer: &mut Trainer,
        saved: &DistillOptions,
        batches_per_epoch: usize,
        examples: usize,
    ) -> Result<TrainerState> {
        let state = TrainerState::read(&self.dir.join(TRAINER_STATE_FILE))?;
        check_same_data(&state, batches_per_epoch, examples, &self.dir)?;
        if state.config.saved() != *saved {
            tracing::warn!(
                "resuming `{}` with options that differ from the checkpoint's: the result will \
                 not equal an uninterrupted run",
                self.dir.display()
            );
        }
        trainer
            .optimizer_mut()
            .load_state(&self.dir.join(OPTIMIZER_FILE))?;
        if trainer.step_count() != self.step {
            return Err(Error::Invalid(format!(
                "`{}`: the optimizer state is at step {}, the folder name says {}",
                self.dir.display(),
                trainer.step_count(),
                self.step
            )));
        }
        Ok(state)
    }
}

fn check_same_data(
    state: &TrainerState,
    batches_per_epoch: usize,
    examples: usize,
    dir: &Path,
) -> Result<()> {
    if state.examples != examples || state.batches_per_epoch != batches_per_epoch {
        return Err(Error::Invalid(format!(
            "`{}`: the checkpoint was trained on {} examples in {} batches per epoch, the data \
             now gives {examples} in {batches_per_epoch}; resuming would change the data order",
            dir.display(),
            state.examples,
            state.batches_per_epoch
        )));
    }
    Ok(())
}

/// Opens `OUTPUT/metrics.jsonl` for a run starting after `start_step`: a fresh run starts an
/// empty file; a resumed one drops the lines of steps after the checkpoint (it writes them
/// again).
pub fn open_metrics(output: &Path, start_step: usize) -> Result<Journal> {
    let path = output.join(METRICS_FILE);
    if start_step == 0 {
        if path.exists() {
            fs_err::remove_file(&path)?;
        }
    } else if path.exists() {
        let (journal, recovered) = Journal::open(&path)?;
        drop(journal);
        let mut text = String::new();
        for record in recovered.records {
            let step = record.get("step").and_then(Value::as_u64).unwrap_or(0);
            if step as usize <= start_step {
                text.push_str(&Value::Object(record).to_string());
                text.push('\n');
            }
        }
        AtomicFile::write_all(&path, text.as_bytes())?;
    }
    Ok(Journal::open(&path)?.0)
}
