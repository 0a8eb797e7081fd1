//! The scoring seam (`TokenScorer`): a server backed by the fixture model (the mock server's
//! model mode) scores exactly what the local model scores, over vLLM `prompt_logprobs`, the
//! `echo` fallback and SGLang's `/generate`, across replicas; mismatched ids are errors that
//! name the record and position.

use retort::ModelSpec;
use retort::backend::Prompt;
use retort::backend::local::LocalBackend;
use retort::backend::open::BackendOptions;
use retort::backend::openai::score::{RemoteScorer, ScoreProtocol};
use retort::backend::scorer::{
    ScoreRequest, ScoreWants, ScorerOptions, SequenceScores, TokenScorer, open_scorer,
};
use retort::mock_scoring::MockModel;
use retort::mock_server::{Fault, FaultPlan, MockServer};

use crate::distill::fixture;

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The fixture model served by a mock server, and loaded locally.
pub(crate) fn served(name: &str, plan: FaultPlan) -> (MockServer, LocalBackend) {
    let local = LocalBackend::load(fixture(name), 4).expect("fixture loads");
    let server = MockServer::start_with_model(plan, MockModel::new(local.model().clone()))
        .expect("mock server starts");
    (server, local)
}

/// `openai:URL#FOLDER`: the served name is the fixture's folder, so its tokenizer is found.
pub(crate) fn spec_of(servers: &[&MockServer], name: &str) -> ModelSpec {
    let urls: Vec<&str> = servers.iter().map(|s| s.url()).collect();
    ModelSpec::parse(&format!("openai:{}#{}", urls.join(","), fixture(name))).expect("spec")
}

pub(crate) fn fast_options() -> BackendOptions {
    BackendOptions {
        concurrency: 8,
        backoff_base: std::time::Duration::from_millis(5),
        backoff_max: std::time::Duration::from_millis(20),
        timeout: std::time::Duration::from_secs(30),
        ..BackendOptions::default()
    }
}

fn requests(scorer: &dyn TokenScorer) -> Vec<ScoreRequest> {
    let texts = [
        ("Q: 2 + 3 = ?\nA:", " 2 plus 3 is 5. The answer is 5."),
        ("Compute 7 * 6.", " 7 * 6 = 42, so 42."),
        ("Hi", " there, friend!"),
        ("x", ""),
    ];
    texts
        .iter()
        .enumerate()
        .map(|(i, (prompt, completion))| ScoreRequest {
            label: format!("record {i}"),
            prompt_ids: scorer
                .prompt_ids(&Prompt::Text((*prompt).to_owned()))
                .expect("prompt encodes"),
            completion_ids: scorer
                .tokenizer()
                .encode(completion, false)
                .expect("completion encodes"),
        })
        .collect()
}

pub(crate) fn max_abs_diff(a: &[SequenceScores], b: &[SequenceScores]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.logprobs.len(), y.logprobs.len());
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            worst = worst.max((p - q).abs());
        }
        assert_eq!(x.top.len(), y.top.len());
        for (p, q) in x.top.iter().zip(&y.top) {
            assert_eq!(
                p.iter().map(|t| t.0).collect::<Vec<_>>(),
                q.iter().map(|t| t.0).collect::<Vec<_>>(),
                "top-k ids"
            );
            for (s, t) in p.iter().zip(q) {
                worst = worst.max((s.1 - t.1).abs());
            }
        }
    }
    worst
}

#[test]
fn remote_scores_equal_local_over_every_protocol() -> TestResult {
    let (server, local) = served("qwen2-tiny", FaultPlan::none());
    let reqs = requests(&local);
    let wants = ScoreWants {
        top_k: 5,
        ranks: true,
    };
    let expected = local.score_ids(&reqs, wants)?;
    for protocol in [
        ScoreProtocol::Auto,
        ScoreProtocol::PromptLogprobs,
        ScoreProtocol::Echo,
        ScoreProtocol::Sglang,
    ] {
        let remote = open_scorer(
            &spec_of(&[&server], "qwen2-tiny"),
            &ScorerOptions {
                backend: fast_options(),
                protocol,
                fallback_tokenizer: None,
            },
        )?;
        let ranked = matches!(
            protocol,
            ScoreProtocol::Auto | ScoreProtocol::PromptLogprobs
        );
        let wants = ScoreWants {
            ranks: ranked,
            ..wants
        };
        let got = remote.score_ids(&reqs, wants)?;
        let diff = max_abs_diff(&expected, &got);
        println!("{protocol:?}: remote vs local log-probs and top-5: max_abs_diff {diff:.3e}");
        assert!(diff < 1e-4, "{protocol:?}: max_abs_diff {diff}");
        if ranked {
            for (e, g) in expected.iter().zip(&got) {
                assert_eq!(e.ranks, g.ranks, "{protocol:?}: ranks");
            }
        } else {
            let err = remote.score_ids(
                &reqs,
                ScoreWants {
                    top_k: 0,
                    ranks: true,
                },
            );
            assert!(err.is_err_and(|e| e.to_string().contains("rank")));
        }
    }
    Ok(())
}

#[test]
fn auto_falls_back_to_echo_when_the_server_ignores_prompt_logprobs() -> TestResult {
    let local = LocalBackend::load(fixture("qwen2-tiny"), 4)?;
    let model = MockModel {
        prompt_logprobs: false,
        ..MockModel::new(local.model().clone())
    };
    let server = MockServer::start_with_model(FaultPlan::none(), model)?;
    let server_spec = spec_of(&[&server], "qwen2-tiny");
    let remote = RemoteScorer::connect(
        server_spec.server().expect("a server"),
        std::path::Path::new(&fixture("qwen2-tiny")),
        ScoreProtocol::Auto,
        &fast_options(),
    )?;
    let reqs = requests(&local);
    let wants = ScoreWants {
        top_k: 3,
        ranks: false,
    };
    let diff = max_abs_diff(
        &local.score_ids(&reqs, wants)?,
        &remote.score_ids(&reqs, wants)?,
    );
    assert!(diff < 1e-4, "max_abs_diff {diff}");
    assert_eq!(remote.protocol(), ScoreProtocol::Echo);
    Ok(())
}

#[test]
fn replicas_share_the_work_and_faults_are_retried() -> TestResult {
    let (a, local) = served("qwen2-tiny", FaultPlan::none());
    let (b, _) = served(
        "qwen2-tiny",
        FaultPlan::schedule(vec![
            Some(Fault::Internal),
            Some(Fault::RateLimited { retry_after_s: 0 }),
        ]),
    );
    let (c, _) = served("qwen2-tiny", FaultPlan::none());
    let spec = spec_of(&[&a, &b, &c], "qwen2-tiny");
    let remote = RemoteScorer::connect(
        spec.server().expect("a server"),
        std::path::Path::new(&fixture("qwen2-tiny")),
        ScoreProtocol::PromptLogprobs,
        &fast_options(),
    )?;
    let mut reqs = Vec::new();
    for round in 0..8 {
        for mut r in requests(&local) {
            r.label = format!("{} round {round}", r.label);
            reqs.push(r);
        }
    }
    let wants = ScoreWants {
        top_k: 2,
        ranks: false,
    };
    let diff = max_abs_diff(
        &local.score_ids(&reqs, wants)?,
        &remote.score_ids(&reqs, wants)?,
    );
    assert!(diff < 1e-4, "max_abs_diff {diff}");
    let sent = remote.replica_requests();
    println!("requests per replica: {sent:?}");
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|&n| n > 0), "{sent:?}");
    assert!(
        b.requests_served() >= 2,
        "the faults were served and retried"
    );
    Ok(())
}

#[test]
fn ids_the_server_does_not_know_name_the_record_and_position() -> TestResult {
    let (server, local) = served("qwen2-tiny", FaultPlan::none());
    let remote = open_scorer(
        &spec_of(&[&server], "qwen2-tiny"),
        &ScorerOptions {
            backend: fast_options(),
            ..ScorerOptions::default()
        },
    )?;
    let mut reqs = requests(&local);
    reqs[1].completion_ids[2] = 100_000;
    let err = remote
        .score_ids(&reqs, ScoreWants::default())
        .expect_err("an id past the vocabulary");
    let message = err.to_string();
    assert!(
        message.contains("record 1") && message.contains("position"),
        "{message}"
    );
    let err = open_scorer(
        &ModelSpec::parse(&format!("openai:{}#not-a-folder", server.url()))?,
        &ScorerOptions::default(),
    )
    .err()
    .expect("no tokenizer for the served name");
    assert!(err.to_string().contains("tokenizer"), "{err}");
    Ok(())
}

/// A local tokenizer that is not the server's (two vocabulary entries swapped) is caught by the
/// probe before any score is trusted.
#[test]
fn a_local_tokenizer_unlike_the_servers_is_an_error() -> TestResult {
    let (server, _) = served("qwen2-tiny", FaultPlan::none());
    let dir = tempfile::tempdir()?;
    let source = std::path::PathBuf::from(fixture("qwen2-tiny"));
    fs_err::copy(
        source.join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )?;
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(source.join("tokenizer.json"))?)?;
    let vocab = tokenizer["model"]["vocab"]
        .as_object_mut()
        .ok_or("a vocabulary")?;
    let (a, b) = (vocab["2"].clone(), vocab["4"].clone());
    vocab.insert("2".into(), b);
    vocab.insert("4".into(), a);
    fs_err::write(dir.path().join("tokenizer.json"), tokenizer.to_string())?;
    let spec = spec_of(&[&server], "qwen2-tiny");
    let remote = RemoteScorer::connect(
        spec.server().ok_or("a server")?,
        dir.path(),
        ScoreProtocol::Auto,
        &fast_options(),
    )?;
    let request = ScoreRequest {
        label: "record 0".into(),
        prompt_ids: vec![5, 6],
        completion_ids: vec![7, 8],
    };
    let err = remote
        .score_ids(&[request], ScoreWants::default())
        .expect_err("the probe catches the swapped entries");
    assert!(err.to_string().contains("tokenizes"), "{err}");
    Ok(())
}
