//! Replicas of one served model ([`Replicas`]): `openai:URL1,URL2#MODEL` spreads requests over
//! several servers, each request going to the replica with the fewest requests outstanding (ties
//! go round-robin). Least-outstanding adapts to replicas of different speed, where round-robin
//! would let a slow one build a queue; it needs no feedback from the servers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// One server of the model.
#[derive(Debug)]
pub(crate) struct Replica {
    /// The API root, `http://host:port/v1`.
    root: String,
    outstanding: AtomicUsize,
    sent: AtomicU64,
}

/// The replicas of one model and their load.
#[derive(Debug)]
pub(crate) struct Replicas {
    replicas: Vec<Replica>,
    next: AtomicUsize,
}

/// A request in flight on a replica; dropping it ends the request.
pub(crate) struct Lease<'a> {
    replica: &'a Replica,
}

impl Replicas {
    /// The replicas at these API roots (at least one).
    pub(crate) fn new<'a>(roots: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            replicas: roots
                .into_iter()
                .map(|root| Replica {
                    root: root.trim_end_matches('/').to_owned(),
                    outstanding: AtomicUsize::new(0),
                    sent: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Picks the replica with the fewest outstanding requests and counts one more on it.
    pub(crate) fn lease(&self) -> Lease<'_> {
        let n = self.replicas.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        // Scanning from a rotating start breaks ties round-robin. The pick and the increment
        // are not one atomic step, so two requests may pick the same replica at once; the
        // imbalance is one request and corrects itself on the next pick.
        let replica = (0..n)
            .map(|i| &self.replicas[(start + i) % n])
            .min_by_key(|r| r.outstanding.load(Ordering::Relaxed))
            .expect("a replica set holds at least one replica");
        replica.outstanding.fetch_add(1, Ordering::Relaxed);
        replica.sent.fetch_add(1, Ordering::Relaxed);
        Lease { replica }
    }

    /// The API roots, in the order given.
    pub(crate) fn roots(&self) -> impl Iterator<Item = &str> {
        self.replicas.iter().map(|r| r.root.as_str())
    }

    /// Requests sent to each replica so far, in the order given.
    pub(crate) fn sent(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .map(|r| r.sent.load(Ordering::Relaxed))
            .collect()
    }
}

impl Lease<'_> {
    /// `ROOT/path`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.replica.root)
    }

    /// The server root without the API suffix `/v1` (SGLang's native `/generate` lives there).
    pub(crate) fn server_root(&self) -> &str {
        self.replica
            .root
            .strip_suffix("/v1")
            .unwrap_or(&self.replica.root)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.replica.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_outstanding_then_round_robin() {
        let replicas = Replicas::new(["http://a/v1", "http://b/v1/", "http://c"]);
        let first = replicas.lease();
        let second = replicas.lease();
        let third = replicas.lease();
        let roots: Vec<String> = [&first, &second, &third]
            .iter()
            .map(|l| l.url("x"))
            .collect();
        assert_eq!(roots, ["http://a/v1/x", "http://b/v1/x", "http://c/x"]);
        assert_eq!(second.server_root(), "http://b");
        drop(second);
        // b is now the only idle replica.
        assert_eq!(replicas.lease().url("x"), "http://b/v1/x");
        assert_eq!(replicas.sent(), vec![1, 2, 1]);
    }
}
