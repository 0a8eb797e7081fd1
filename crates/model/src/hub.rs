//! `hf:ORG/NAME[@REV]` model specs resolved from the local Hugging Face cache.
//!
//! The cache root is `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`. A model lives in `models--ORG--NAME/`; `refs/<rev>` holds the
//! commit hash and `snapshots/<hash>/` the files. Nothing is downloaded.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A parsed `hf:ORG/NAME[@REV]` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfSpec {
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit hash (default `main`).
    pub revision: String,
}

impl HfSpec {
    /// Parses `hf:ORG/NAME[@REV]`; `None` when `spec` does not start with `hf:`.
    pub fn parse(spec: &str) -> Option<Result<Self>> {
        let rest = spec.strip_prefix("hf:")?;
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (rest, "main"),
        };
        let valid = repo.split('/').count() == 2
            && repo
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
            && !revision.is_empty()
            && !revision.split('/').any(|p| p.is_empty() || p == "..");
        if !valid {
            return Some(Err(Error::invalid(format!(
                "invalid model spec `{spec}`: expected `hf:ORG/NAME` or `hf:ORG/NAME@REVISION`"
            ))));
        }
        Some(Ok(Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        }))
    }

    /// The repo's folder name in the cache: `models--ORG--NAME`.
    pub fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

/// The Hugging Face hub cache root from the environment, if one can be determined.
pub fn default_cache_dir() -> Option<PathBuf> {
    for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(v));
        }
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(home).join("hub"));
    }
    std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("huggingface")
            .join("hub")
    })
}

/// Resolves `spec` to its snapshot folder under `cache` (or [`default_cache_dir`]).
pub fn resolve(spec: &HfSpec, cache: Option<&Path>) -> Result<PathBuf> {
    let cache = match cache {
        Some(c) => c.to_path_buf(),
        None => default_cache_dir().ok_or_else(|| {
            Error::model("cannot locate the Hugging Face cache: set `HF_HOME` or `HF_HUB_CACHE`")
        })?,
    };
    let repo_dir = cache.join(spec.cache_folder());
    let hint = format!(
        "hint: download it first, e.g. `huggingface-cli download {}{}`",
        spec.repo,
        if spec.revision == "main" {
            String::new()
        } else {
            format!(" --revision {}", spec.revision)
        }
    );
    if !repo_dir.is_dir() {
        return Err(Error::model(format!(
            "model `hf:{}` is not in the local Hugging Face cache (no `{}`)\n{hint}",
            spec.repo,
            repo_dir.display()
        )));
    }
    let ref_file = repo_dir.join("refs").join(&spec.revision);
    let commit = if ref_file.is_file() {
        fs_err::read_to_string(&ref_file)?.trim().to_string()
    } else {
        spec.revision.clone()
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        let available: Vec<String> = fs_err::read_dir(repo_dir.join("snapshots"))
            .map(|rd| {
                rd.filter_map(std::result::Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err(Error::model(format!(
            "revision `{}` of `hf:{}` is not in the local cache `{}` (snapshots: {})\n{hint}",
            spec.revision,
            spec.repo,
            repo_dir.display(),
            if available.is_empty() {
                "none".to_string()
            } else {
                available.join(", ")
            }
        )));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s = HfSpec::parse("hf:Qwen/Qwen2.5-0.5B@v1")
            .expect("hf")
            .expect("valid");
        assert_eq!(s.repo, "Qwen/Qwen2.5-0.5B");
        assert_eq!(s.revision, "v1");
        assert_eq!(s.cache_folder(), "models--Qwen--Qwen2.5-0.5B");
        assert_eq!(
            HfSpec::parse("hf:a/b")
                .expect("hf")
                .expect("valid")
                .revision,
            "main"
        );
        assert!(HfSpec::parse("./local").is_none());
        assert!(HfSpec::parse("hf:noslash").expect("hf").is_err());
        assert!(HfSpec::parse("hf:a/../b").expect("hf").is_err());
    }
}
