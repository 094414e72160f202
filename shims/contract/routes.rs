//! Which requests a layer covers (path patterns), and how long the operations of each route
//! have been taking (for the `Retry-After` hint of a 409).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use parking_lot::Mutex;

/// A path pattern of [`Config::paths`](super::Config::paths): `/orders`, `/orders/{id}/pay`,
/// `/files/{*rest}`.
///
/// The pattern and the request path are compared segment by segment (the parts between `/`):
/// `{name}` matches any one non-empty segment, `{*name}` (last only) matches the rest of the
/// path, one segment or more, and every other segment must be equal. The syntax is Axum's route
/// syntax, so a layer can name the same strings as the router. It is matched against the whole
/// path the client sent, in every position of the layer: on Axum the router's `OriginalUri`
/// (inside a nested router too), on Actix the percent-decoded path Actix routes on. A path
/// rewrite that runs after the layer (Actix's `NormalizePath` wrapped inside it) is not seen:
/// wrap such middleware outside the idempotency middleware.
#[derive(Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl PathPattern {
    /// Parses a pattern.
    ///
    /// # Errors
    /// A message for a pattern that does not start with `/`, has a `{*name}` that is not the
    /// last segment, or a brace that does not close a whole segment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("path pattern `{text}` must start with `/`"));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment =
                if let Some(name) = part.strip_prefix("{*").and_then(|p| p.strip_suffix('}')) {
                    if i + 1 != parts.len() {
                        return Err(format!(
                            "path pattern `{text}`: `{{*{name}}}` must be the last segment"
                        ));
                    }
                    Segment::Rest
                } else if part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
                    Segment::One
                } else if part.contains(['{', '}']) {
                    return Err(format!(
                        "path pattern `{text}`: `{part}` is neither a literal segment nor a whole \
                     `{{name}}` / `{{*name}}` segment"
                    ));
                } else {
                    Segment::Literal((*part).to_owned())
                };
            segments.push(segment);
        }
        Ok(PathPattern {
            text: text.to_owned(),
            segments,
        })
    }

    /// Whether `path` (without its query string) matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return parts.next().is_some_and(|p| !p.is_empty()),
                Segment::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(l) => match parts.next() {
                    Some(p) if p == l => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

/// How many runs of a route are remembered.
const RUNS: usize = 16;
/// How many routes are remembered (paths with ids in them, seen without a route template,
/// must not grow the table without bound); past it the table starts over.
const MAX_ROUTES: usize = 512;

/// The durations of the last runs of each route.
#[derive(Default)]
pub(crate) struct Timings {
    routes: Mutex<HashMap<Box<str>, Runs>>,
}

#[derive(Default)]
struct Runs {
    millis: [u32; RUNS],
    len: usize,
    next: usize,
}

impl Timings {
    /// Remembers that a run of `route` took `took`.
    pub(crate) fn record(&self, route: &str, took: Duration) {
        let ms = u32::try_from(took.as_millis()).unwrap_or(u32::MAX);
        let mut routes = self.routes.lock();
        if !routes.contains_key(route) {
            if routes.len() >= MAX_ROUTES {
                // Paths with ids in them (no route template known) would fill the table with
                // the first ones seen for good: start it over instead.
                routes.clear();
            }
            routes.insert(route.into(), Runs::default());
        }
        let Some(runs) = routes.get_mut(route) else {
            return;
        };
        runs.millis[runs.next] = ms;
        runs.next = (runs.next + 1) % RUNS;
        runs.len = (runs.len + 1).min(RUNS);
    }

    /// The longest of the last runs of `route`, if one was seen.
    pub(crate) fn longest(&self, route: &str) -> Option<Duration> {
        let routes = self.routes.lock();
        let runs = routes.get(route)?;
        runs.millis[..runs.len]
            .iter()
            .max()
            .map(|ms| Duration::from_millis(u64::from(*ms)))
    }
}

impl fmt::Debug for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timings")
            .field("routes", &self.routes.lock().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap()
    }

    #[test]
    fn patterns() {
        assert!(p("/orders").matches("/orders"));
        assert!(!p("/orders").matches("/orders/1"));
        assert!(!p("/orders").matches("/order"));
        assert!(!p("/orders").matches("/orders/"));
        assert!(p("/orders/").matches("/orders/"));
        assert!(p("/orders/{id}/pay").matches("/orders/42/pay"));
        assert!(!p("/orders/{id}/pay").matches("/orders//pay"));
        assert!(!p("/orders/{id}/pay").matches("/orders/42"));
        assert!(p("/files/{*rest}").matches("/files/a/b/c"));
        assert!(p("/files/{*rest}").matches("/files/a"));
        assert!(!p("/files/{*rest}").matches("/files"));
        assert!(!p("/files/{*rest}").matches("/files/"));
        assert!(p("/").matches("/"));
        assert!(!p("/").matches("/x"));
        assert!(!p("/x").matches("x"));
        for bad in ["orders", "/{*a}/b", "/a{b}", "/{}", "/a}"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timings_keep_the_longest_of_the_last_runs() {
        let t = Timings::default();
        assert_eq!(t.longest("/a"), None);
        t.record("/a", Duration::from_millis(900));
        for _ in 0..RUNS - 1 {
            t.record("/a", Duration::from_millis(100));
        }
        assert_eq!(t.longest("/a"), Some(Duration::from_millis(900)));
        t.record("/a", Duration::from_millis(100));
        assert_eq!(t.longest("/a"), Some(Duration::from_millis(100)));
        for i in 0..MAX_ROUTES + 10 {
            t.record(&format!("/r/{i}"), Duration::from_millis(7));
        }
        assert!(t.routes.lock().len() <= MAX_ROUTES);
        assert_eq!(t.longest("/never-seen"), None);
        assert_eq!(
            t.longest(&format!("/r/{}", MAX_ROUTES + 9)),
            Some(Duration::from_millis(7))
        );
    }
}
