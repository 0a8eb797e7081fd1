//! Model specs (DESIGN.md §2 "Model specs"): what `--model`, `--teacher`, `--student` and the
//! TOML keys name, parsed once at the edge into a [`ModelSpec`]. This is the one place that
//! decides local vs remote ([`ModelSpec::is_remote`]) and where a local spec becomes a folder
//! ([`ModelSpec::local_dir`]).
//!
//! | text | variant |
//! |---|---|
//! | `PATH` | [`ModelSpec::Folder`]: a Hugging Face folder, or a PEFT adapter folder (loaded onto the base its `adapter_config.json` names) |
//! | `hf:ORG/NAME[@REV]` | [`ModelSpec::Hub`]: that snapshot in the local Hugging Face cache |
//! | `world:teacher`, `world:student` | [`ModelSpec::World`]: the bundled demo models |
//! | `openai:URL#MODEL` | [`ModelSpec::Server`]: an OpenAI-compatible server; the key comes from `RETORT_API_KEY` or `OPENAI_API_KEY` |
//! | `openai:URL1,URL2,...#MODEL` | [`ModelSpec::Server`] with replicas: several servers of one model; requests go to the replica with the fewest outstanding |
//!
//! `Display` (and serde, which writes the same text) hides a URL's `user:password@`, so a spec
//! can go into records, manifests and saved configs as it is.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use retort_model::hub::HfSpec;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// Environment variables that hold a server's API key, in order of precedence.
pub const API_KEY_VARS: [&str; 2] = ["RETORT_API_KEY", "OPENAI_API_KEY"];
/// Overrides the folder of the bundled `world:` models.
pub const WORLD_DIR_VAR: &str = "RETORT_WORLD_DIR";

/// A model a command can use, local or behind a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A Hugging Face model folder, or a PEFT adapter folder.
    Folder(PathBuf),
    /// `hf:ORG/NAME[@REV]` in the local Hugging Face cache (nothing is downloaded).
    Hub(HfSpec),
    /// `world:NAME`: a bundled demo model.
    World(String),
    /// `openai:URL#MODEL`: an OpenAI-compatible server (vLLM, SGLang, llama.cpp, hosted APIs).
    Server(ServerSpec),
}

/// An OpenAI-compatible server (one or more replicas) and the model it serves.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// The API root, without a trailing slash (`http://host:8000/v1`); may hold userinfo. With
    /// replicas, the first one.
    pub url: String,
    /// Further replicas of the same model (`openai:URL1,URL2#MODEL`), in the order given.
    pub replicas: Vec<String>,
    /// The served model's name.
    pub model: String,
}

impl ServerSpec {
    /// One server.
    pub fn single(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            replicas: Vec::new(),
            model: model.into(),
        }
    }

    /// Every replica's API root: [`Self::url`], then [`Self::replicas`].
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.replicas.iter().map(String::as_str))
    }

    /// The spec as text with any `user:password@` hidden.
    pub fn redacted(&self) -> String {
        let urls: Vec<String> = self.urls().map(redact).collect();
        format!("openai:{}#{}", urls.join(","), self.model)
    }

    /// Where the API key comes from: the first of [`API_KEY_VARS`] that is set and not empty.
    pub fn key_source(&self) -> Option<&'static str> {
        API_KEY_VARS
            .into_iter()
            .find(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()))
    }
}

impl fmt::Debug for ServerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl ModelSpec {
    /// Parses a spec (see the module docs); a malformed `openai:` or `hf:` spec is an error that
    /// shows the expected form.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.is_empty() {
            return Err(Error::Invalid(
                "empty model spec; expected a folder, `hf:ORG/NAME`, `openai:URL#MODEL` or \
                 `world:NAME`"
                    .into(),
            ));
        }
        if let Some(rest) = text.strip_prefix("openai:") {
            return parse_server(text, rest).map(Self::Server);
        }
        if let Some(hub) = HfSpec::parse(text) {
            return Ok(Self::Hub(hub?));
        }
        if let Some(name) = text.strip_prefix("world:") {
            if name.is_empty() || name.contains(['/', '\\']) || name == ".." {
                return Err(Error::Invalid(format!(
                    "invalid model spec `{text}`: expected `world:teacher` or `world:student`"
                )));
            }
            return Ok(Self::World(name.to_string()));
        }
        Ok(Self::Folder(PathBuf::from(text)))
    }

    /// A local folder spec.
    pub fn folder(path: impl Into<PathBuf>) -> Self {
        Self::Folder(path.into())
    }

    /// Whether the model is behind a server.
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Server(_))
    }

    /// The server, for a remote spec.
    pub fn server(&self) -> Option<&ServerSpec> {
        match self {
            Self::Server(server) => Some(server),
            _ => None,
        }
    }

    /// The folder a local spec names, without checking that it exists; `None` for a server or
    /// an `hf:` spec whose snapshot is not in the cache.
    pub fn local_path(&self) -> Option<PathBuf> {
        match self {
            Self::Folder(path) => Some(path.clone()),
            Self::World(name) => Some(world_dir().join(name)),
            Self::Hub(hub) => retort_model::hub::resolve(hub, None).ok(),
            Self::Server(_) => None,
        }
    }

    /// The model's folder: a folder as given, a bundled world model, or an `hf:` snapshot in the
    /// local cache. A server, or a folder that does not exist, is an error with a hint.
    pub fn local_dir(&self) -> Result<PathBuf> {
        let dir = match self {
            Self::Server(server) => {
                return Err(Error::Invalid(format!(
                    "`{}` is a server; this needs a local model (a Hugging Face folder, \
                     `hf:ORG/NAME` or `world:NAME`)",
                    server.redacted()
                )));
            }
            Self::Hub(hub) => retort_model::hub::resolve(hub, None)?,
            Self::Folder(path) => path.clone(),
            Self::World(name) => world_dir().join(name),
        };
        check_folder(self, &dir)?;
        Ok(dir)
    }
}

/// The folder of the bundled world models: [`WORLD_DIR_VAR`], else the checkout's
/// `assets/world`.
pub fn world_dir() -> PathBuf {
    match std::env::var_os(WORLD_DIR_VAR).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/world"),
    }
}

/// Hides the `user:password@` of a URL inside `text` (the one redactor: specs, records and
/// manifests all use it).
pub fn redact(text: &str) -> String {
    match (text.find("://"), text.find('@')) {
        (Some(scheme), Some(at)) if at > scheme && !text[scheme + 3..at].contains('/') => {
            format!("{}****@{}", &text[..scheme + 3], &text[at + 1..])
        }
        _ => text.to_string(),
    }
}

fn check_folder(spec: &ModelSpec, dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let text = spec.to_string();
    let hint = if dir.is_file() {
        "\nhint: pass the folder that holds `config.json`, not a file".to_string()
    } else if matches!(spec, ModelSpec::Folder(_)) && looks_like_hub_name(&text) {
        format!("\nhint: did you mean `hf:{text}` (a model in the local Hugging Face cache)?")
    } else {
        String::new()
    };
    Err(Error::Invalid(format!(
        "model folder `{}` does not exist{hint}",
        dir.display()
    )))
}

/// `ORG/NAME` with no other path parts, as a hub name is written.
fn looks_like_hub_name(text: &str) -> bool {
    let parts: Vec<&str> = text.split('/').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && !p.starts_with('.') && !p.contains('\\'))
}

fn parse_server(text: &str, rest: &str) -> Result<ServerSpec> {
    let invalid = |why: &str| {
        Error::Invalid(format!(
            "model spec `{}`: {why}; expected `openai:URL#MODEL`, e.g. \
             `openai:http://127.0.0.1:8000/v1#Qwen/Qwen3-8B`",
            redact(text)
        ))
    };
    let (urls, model) = rest
        .rsplit_once('#')
        .ok_or_else(|| invalid("missing `#MODEL`"))?;
    if model.trim().is_empty() {
        return Err(invalid("empty model name"));
    }
    let mut parsed = Vec::new();
    for url in urls.split(',') {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid("each URL must start with `http://` or `https://`"));
        }
        reqwest::Url::parse(url).map_err(|e| invalid(&format!("bad URL ({e})")))?;
        let url = url.trim_end_matches('/').to_owned();
        if parsed.contains(&url) {
            return Err(invalid(&format!(
                "replica `{}` is listed twice",
                redact(&url)
            )));
        }
        parsed.push(url);
    }
    let url = parsed.remove(0);
    Ok(ServerSpec {
        url,
        replicas: parsed,
        model: model.to_owned(),
    })
}

impl FromStr for ModelSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Self::parse(text)
    }
}

/// The spec as written, with a server URL's userinfo hidden.
impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Folder(path) => write!(f, "{}", path.display()),
            Self::Hub(hub) if hub.revision == "main" => write!(f, "hf:{}", hub.repo),
            Self::Hub(hub) => write!(f, "hf:{}@{}", hub.repo, hub.revision),
            Self::World(name) => write!(f, "world:{name}"),
            Self::Server(server) => f.write_str(&server.redacted()),
        }
    }
}

impl Serialize for ModelSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ModelSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_their_kinds_and_print_back() -> Result<()> {
        for (text, remote) in [
            ("models/qwen", false),
            ("hf:Qwen/Qwen2.5-0.5B", false),
            ("hf:Qwen/Qwen2.5-0.5B@v1", false),
            ("world:teacher", false),
            ("openai:http://127.0.0.1:8000/v1#Qwen/Qwen3-8B", true),
            (
                "openai:http://a:8000/v1,http://b:8000/v1#Qwen/Qwen3-8B",
                true,
            ),
        ] {
            let spec = ModelSpec::parse(text)?;
            assert_eq!(spec.is_remote(), remote, "{text}");
            assert_eq!(spec.to_string(), text);
            assert_eq!(ModelSpec::parse(&spec.to_string())?, spec);
        }
        let server = ModelSpec::parse("openai:http://127.0.0.1:8000/v1/#m")?;
        assert_eq!(
            server.server().map(|s| s.url.as_str()),
            Some("http://127.0.0.1:8000/v1")
        );
        Ok(())
    }

    #[test]
    fn bad_specs_say_what_was_expected() {
        for bad in [
            "",
            "openai:http://x/v1",
            "openai:x/v1#m",
            "openai:http://x#",
            "openai:http://x/v1,x/v1#m",
            "openai:http://x/v1,http://x/v1#m",
            "hf:onlyname",
            "world:",
        ] {
            let err = ModelSpec::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("expected"), "{bad}: {err}");
        }
    }

    #[test]
    fn userinfo_never_prints() -> Result<()> {
        let replicas = ModelSpec::parse("openai:http://h:1/v1,http://user:pw@h:2/v1#m")?;
        assert_eq!(
            replicas.to_string(),
            "openai:http://h:1/v1,http://****@h:2/v1#m"
        );
        assert_eq!(replicas.server().map(|s| s.urls().count()), Some(2));
        let spec = ModelSpec::parse("openai:http://user:pw@h:1/v1#m")?;
        for shown in [
            spec.to_string(),
            format!("{spec:?}"),
            serde_json::to_string(&spec).unwrap_or_default(),
        ] {
            assert!(!shown.contains("pw"), "{shown}");
        }
        let err = ModelSpec::parse("openai:http://user:pw@h:1/v1").expect_err("no model");
        assert!(!err.to_string().contains("pw"));
        Ok(())
    }

    #[test]
    fn missing_folders_get_hints() -> Result<()> {
        let err = ModelSpec::parse("Qwen/Qwen2.5-0.5B")?.local_dir();
        assert!(err.is_err_and(|e| e.to_string().contains("hf:Qwen/Qwen2.5-0.5B")));
        let file = std::env::current_exe().map_err(Error::from)?;
        let err = ModelSpec::folder(file).local_dir();
        assert!(err.is_err_and(|e| e.to_string().contains("config.json")));
        let server = ModelSpec::parse("openai:http://h:1/v1#m")?;
        assert!(
            server
                .local_dir()
                .is_err_and(|e| e.to_string().contains("server"))
        );
        Ok(())
    }
}
