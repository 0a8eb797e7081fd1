//! The life of a command's output: [`start`] checks a rerun against the manifest already there
//! (`retort::identity::begin`) and marks the run `running`; [`end`] writes the final status, and
//! an interrupted run says how far it got and how to resume, exiting 130 (SIGINT) or 143 (SIGTERM).

use std::path::Path;
use std::process::ExitCode;

use retort::identity::{Begun, Identity, RunStatus, SameRun, begin};
use retort::manifest::{Manifest, redact_args};

/// Begins the run of `identity` into `output` (see `retort::identity`), printing what happens to
/// an existing output.
pub fn start(
    output: &Path,
    identity: Identity,
    settings: serde_json::Value,
    same_run: SameRun,
    overwrite: bool,
) -> anyhow::Result<Manifest> {
    let (manifest, begun) = begin(output, identity, settings, same_run, overwrite)?;
    if let Begun::Continued(status) = begun {
        tracing::info!(
            "`{}` holds this run ({}): continuing it",
            output.display(),
            status.name()
        );
    }
    Ok(manifest)
}

/// Writes the manifest with the status of `result` (an error while a stop was requested counts
/// as interrupted) and passes the result on.
pub fn fail_on_error<T>(
    manifest: &mut Manifest,
    output: &Path,
    result: anyhow::Result<T>,
) -> anyhow::Result<T> {
    if result.is_err() {
        let status = if retort::interrupt::requested().is_some() {
            RunStatus::Interrupted
        } else {
            RunStatus::Failed
        };
        if let Err(e) = manifest.finish(output, status) {
            tracing::warn!("cannot update the manifest of `{}`: {e}", output.display());
        }
    }
    result
}

/// Reports an interrupted run: how far it got and the command that resumes it (the same command
/// line, plus `extra` such as `--resume`); returns the exit code for the signal.
pub fn interrupted(what: &str, extra: &[&str]) -> ExitCode {
    let signal = retort::interrupt::requested().unwrap_or(retort::interrupt::SIGINT);
    let mut command = redact_args(std::env::args());
    if let Some(first) = command.first_mut() {
        *first = "retort".into();
    }
    for flag in extra {
        if !command.iter().any(|arg| arg == flag) {
            command.push((*flag).to_string());
        }
    }
    eprintln!(
        "interrupted: {what}; the manifest says `interrupted`\nresume with: {}",
        command.join(" ")
    );
    ExitCode::from(retort::interrupt::exit_code(signal))
}

/// A started run: its manifest, written again with status `failed` (or `interrupted` when a stop
/// was requested) if the command returns early, or with the status given to [`Run::finish`].
pub struct Run {
    /// The manifest; fill in inputs, models and counts before finishing.
    pub manifest: Manifest,
    output: std::path::PathBuf,
    finished: bool,
}

impl Run {
    /// [`start`]s a run into `output`.
    pub fn start(
        output: &Path,
        identity: Identity,
        settings: serde_json::Value,
        same_run: SameRun,
        overwrite: bool,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            manifest: start(output, identity, settings, same_run, overwrite)?,
            output: output.to_path_buf(),
            finished: false,
        })
    }

    /// Writes the manifest with its final status.
    pub fn finish(mut self, status: RunStatus) -> anyhow::Result<()> {
        self.finished = true;
        self.manifest.finish(&self.output, status)?;
        Ok(())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.finished {
            let result: anyhow::Result<()> = Err(anyhow::anyhow!("the command stopped early"));
            let _ = fail_on_error(&mut self.manifest, &self.output, result);
        }
    }
}
