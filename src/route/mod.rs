//! Step 2: method + path to a configured route.
//!
//! Routes are tried in config order and the first whose method and path
//! match wins, so a catch-all placed last never shadows the routes above it.
//! Each route's path is a `matchit` pattern (`{param}`, `{*rest}`).
//!
//! What is matched is what the backend will run: the path in its canonical
//! form ([`path`]), which is also the path forwarded, and the method with no
//! override header beside it ([`method`]). A path that differs from a metered
//! route only in letter case or a trailing slash, which Express and others
//! route to the same handler, is metered by that route ([`PathCase`]).

mod candidates;
mod method;
pub mod path;

use std::borrow::Cow;
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Method, Request, Uri};

use self::candidates::Candidates;
use crate::llm::CompletionBound;
use crate::llm::estimate::EstimateRules;
use crate::metrics::RouteMetrics;
use crate::quota::Amounts;
use crate::store::OnStoreError;

pub use self::path::{Ambiguity, AmbiguousPaths, PathError};

/// A configured route: what a request matching it costs and where it goes.
#[derive(Clone, Debug)]
pub struct Route {
    pub name: Arc<str>,
    /// `None` matches any method.
    pub method: Option<Method>,
    pub path: String,
    /// Index into the config's upstreams.
    pub upstream: usize,
    /// `None`: unmetered, streamed through untouched.
    pub cost: Option<Cost>,
    /// How an estimate route prices a body (`default_max_tokens`, `image_tokens`).
    pub estimate: EstimateRules,
    /// What an estimate route does with the body's completion bound.
    pub completion_bound: CompletionBound,
    /// Overrides `store.on_error` for this route.
    pub on_store_error: Option<OnStoreError>,
    /// Upstream statuses that refund the reservation; `None`: every non-2xx.
    pub refund_statuses: Option<Vec<http::StatusCode>>,
    /// This route's counters: counted nowhere as the config is read, bound
    /// to the process's families when the per-config parts are built, so
    /// that a request counts without a label lookup.
    pub metrics: RouteMetrics,
}

impl Route {
    /// Whether an upstream answer with `status` gives the reservation back.
    pub fn refunds(&self, status: http::StatusCode) -> bool {
        match &self.refund_statuses {
            Some(statuses) => statuses.contains(&status),
            None => !status.is_success(),
        }
    }
}

/// What a metered route charges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    pub fixed: Amounts,
    /// Tokens are estimated from the request body.
    pub estimate_tokens: bool,
}

/// Whether letter case tells paths apart when a metered route is sought.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathCase {
    /// `/API/v1/X` is metered by a route for `/api/v1/x`, as Express (and
    /// any case-insensitive backend) would run that route's handler. A
    /// case-sensitive backend answers 404, and a failed call is refunded.
    #[default]
    Insensitive,
    /// For backends known to route case-sensitively.
    Sensitive,
}

/// How request paths are read: `[server] ambiguous_paths` and `path_case`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathRules {
    pub ambiguous: AmbiguousPaths,
    pub case: PathCase,
}

/// Why a request's method and path cannot be routed as sent.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("methods are case-sensitive: send this one as {0}")]
    MethodCase(Method),
    #[error("the normalized path could not be forwarded")]
    Unforwardable,
}

pub struct Router {
    routes: Vec<Entry>,
    /// The routes a path can match exactly.
    exact: Candidates,
    /// The metered routes a path's loose key can match.
    loose: Candidates,
    rules: PathRules,
    /// Every method a route names, for [`method::miscased`].
    methods: Vec<Method>,
}

struct Entry {
    route: Arc<Route>,
    exact: matchit::Router<()>,
    loose: Loose,
}

/// How a route matches a path's loose key ([`loose_key`]).
enum Loose {
    /// Not at all: only metered routes are sought loosely.
    Unmetered,
    /// As `exact` does: the pattern is its own loose form.
    Same,
    /// By the matcher of the pattern's loose form.
    Own(matchit::Router<()>),
}

impl Entry {
    fn allows(&self, method: &Method) -> bool {
        self.route.method.as_ref().is_none_or(|m| m == method)
    }

    /// Whether this metered route takes `path` by its loose key `key` but
    /// not as it is; `key_differs` tells whether `key` is not `path`.
    fn matches_loosely(&self, path: &str, key: &str, key_differs: bool) -> bool {
        let loose = match &self.loose {
            Loose::Unmetered => return false,
            Loose::Same if !key_differs => return false,
            Loose::Same => self.exact.at(key).is_ok(),
            Loose::Own(matcher) => matcher.at(key).is_ok(),
        };
        loose && self.exact.at(path).is_err()
    }
}

impl Router {
    /// Builds the router from validated routes, whose patterns
    /// [`check_pattern`] has accepted.
    pub fn new(config: &[Route], rules: PathRules) -> Router {
        let mut loose_patterns = Vec::new();
        let routes: Vec<Entry> = config
            .iter()
            .filter_map(|route| {
                let exact = matcher(&route.path)?;
                let loose = match &route.cost {
                    None => Loose::Unmetered,
                    Some(_) => match loose_key(&route.path, rules.case) {
                        Cow::Borrowed(pattern) => {
                            loose_patterns.push(pattern.to_owned());
                            Loose::Same
                        }
                        Cow::Owned(pattern) => match matcher(&pattern) {
                            Some(own) => {
                                loose_patterns.push(pattern);
                                Loose::Own(own)
                            }
                            None => {
                                loose_patterns.push(route.path.clone());
                                Loose::Same
                            }
                        },
                    },
                };
                Some(Entry {
                    route: Arc::new(route.clone()),
                    exact,
                    loose,
                })
            })
            .collect();
        let exact = Candidates::new(positions(&routes).zip(routes.iter().map(|e| &*e.route.path)));
        let metered = positions(&routes).filter(|&at| routes[at as usize].route.cost.is_some());
        let loose = Candidates::new(metered.zip(loose_patterns.iter().map(String::as_str)));
        let methods = config.iter().filter_map(|r| r.method.clone()).collect();
        Router {
            routes,
            exact,
            loose,
            rules,
            methods,
        }
    }

    /// The route `request` takes, once its method is checked, its override
    /// headers are gone and its path is in the normal form it is forwarded
    /// with; `None` when no route matches.
    pub fn route<B>(&self, request: &mut Request<B>) -> Result<Option<&Arc<Route>>, TargetError> {
        if let Some(meant) = method::miscased(request.method(), &self.methods) {
            return Err(TargetError::MethodCase(meant.clone()));
        }
        method::remove_overrides(request.headers_mut());
        let normal = path::normalize(request.uri().path(), self.rules.ambiguous)?;
        let route = self.find(request.method(), normal.routed());
        if let Cow::Owned(forwarded) = normal.forwarded {
            replace_path(request.uri_mut(), forwarded)?;
        }
        Ok(route)
    }

    /// The route for `method` and a path in normal form: the first in
    /// config order that matches it, unless that one is unmetered (or there
    /// is none) and a metered route matches the path's loose key, though
    /// not the path itself. Metering wins there, as the backend may well run
    /// the metered handler.
    pub fn find(&self, method: &Method, path: &str) -> Option<&Arc<Route>> {
        let exact = self
            .tried(&self.exact, path)
            .find(|entry| entry.allows(method) && entry.exact.at(path).is_ok());
        match exact {
            Some(entry) if entry.route.cost.is_some() => Some(&entry.route),
            _ => self
                .find_loosely(method, path)
                .or(exact.map(|entry| &entry.route)),
        }
    }

    fn find_loosely(&self, method: &Method, path: &str) -> Option<&Arc<Route>> {
        // Most paths an unmetered route takes share no first segment with
        // any metered route's: those need no loose key.
        if !self
            .loose
            .may_meet(path, self.rules.case == PathCase::Insensitive)
        {
            return None;
        }
        let key = loose_key(path, self.rules.case);
        let key_differs = matches!(key, Cow::Owned(_));
        self.tried(&self.loose, &key)
            .find(|entry| entry.allows(method) && entry.matches_loosely(path, &key, key_differs))
            .map(|entry| &entry.route)
    }

    /// The routes of `index` that can match `path`, in config order.
    fn tried<'a>(&'a self, index: &'a Candidates, path: &str) -> impl Iterator<Item = &'a Entry> {
        index
            .of(path)
            .iter()
            .filter_map(|&at| self.routes.get(at as usize))
    }
}

/// Each entry's position, as the index keeps it.
fn positions(routes: &[Entry]) -> impl Iterator<Item = u32> + use<> {
    0..u32::try_from(routes.len()).unwrap_or(u32::MAX)
}

/// A matcher of `pattern`.
fn matcher(pattern: &str) -> Option<matchit::Router<()>> {
    let mut matcher = matchit::Router::new();
    matcher.insert(pattern, ()).ok()?;
    // A trailing catch-all needs at least one character in matchit;
    // `/{*rest}` must also match `/` itself.
    if let Some(at) = pattern.find("{*") {
        let _ = matcher.insert(&pattern[..at], ());
    }
    Some(matcher)
}

/// A path or pattern as a loose match compares it: without a trailing
/// slash, and in lower case unless case is told apart. Borrowed when that
/// is `text` itself, as for nearly every path.
fn loose_key(text: &str, case: PathCase) -> Cow<'_, str> {
    let trimmed = match text.strip_suffix('/') {
        Some(rest) if !rest.is_empty() => rest,
        _ => text,
    };
    let fold = case == PathCase::Insensitive && trimmed.bytes().any(|b| b.is_ascii_uppercase());
    match (fold, trimmed.len() == text.len()) {
        (true, _) => Cow::Owned(trimmed.to_ascii_lowercase()),
        (false, true) => Cow::Borrowed(text),
        (false, false) => Cow::Owned(trimmed.to_string()),
    }
}

/// Puts `path` in place of `uri`'s path, keeping its query.
fn replace_path(uri: &mut Uri, path: String) -> Result<(), TargetError> {
    let mut parts = std::mem::take(uri).into_parts();
    let path_and_query = match parts.path_and_query.as_ref().and_then(PathAndQuery::query) {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).map_err(|_| TargetError::Unforwardable)?);
    *uri = Uri::from_parts(parts).map_err(|_| TargetError::Unforwardable)?;
    Ok(())
}

/// Whether `pattern` is a path pattern the router accepts.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if !pattern.starts_with('/') {
        return Err(format!("{pattern:?} must start with '/'"));
    }
    // matchit would take `:id` as literal text, so the route would never
    // match what its author meant.
    if pattern.split('/').any(|segment| segment.starts_with(':')) {
        return Err(format!(
            "{pattern:?} has an express-style `:name` parameter, which would only match that text literally; write {:?}",
            braced_params(pattern)
        ));
    }
    matchit::Router::new()
        .insert(pattern, ())
        .map_err(|e| format!("{pattern:?} is not a valid path pattern: {e}"))
}

/// `pattern` with each express-style `:name` segment written as `{name}`.
fn braced_params(pattern: &str) -> String {
    let segments: Vec<String> = pattern
        .split('/')
        .map(|segment| match segment.strip_prefix(':') {
            Some("") => "{param}".to_string(),
            Some(name) => format!("{{{name}}}"),
            None => segment.to_string(),
        })
        .collect();
    segments.join("/")
}

/// Whether a route tried earlier, with `earlier`'s method (`None`: any) and
/// path pattern, takes every request the route with `later`'s could match,
/// so that the later one can never match. Both patterns must have passed
/// [`check_pattern`]. Only certain cases count: a segment mixing text and a
/// parameter, or holding an escaped brace, covers nothing but itself.
pub fn shadows(earlier: (Option<&Method>, &str), later: (Option<&Method>, &str)) -> bool {
    let method_covered = match (earlier.0, later.0) {
        (None, _) => true,
        (Some(a), Some(b)) => a == b,
        (Some(_), None) => false,
    };
    method_covered && Shape::of(earlier.1).covers(&Shape::of(later.1))
}

/// One `/`-separated segment of a pattern.
#[derive(PartialEq, Eq)]
enum Piece<'a> {
    /// Literal text, possibly empty (`/v1/` ends in an empty segment).
    Text(&'a str),
    /// `{name}`: one or more characters other than `/`.
    Param,
    /// Anything else: `img-{id}.png`, `{{literal}}`, `v{*rest}`.
    Mixed(&'a str),
}

impl Piece<'_> {
    fn of(segment: &str) -> Piece<'_> {
        match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) if !name.contains(['{', '}', '*']) => Piece::Param,
            _ if segment.contains(['{', '}']) => Piece::Mixed(segment),
            _ => Piece::Text(segment),
        }
    }

    /// Whether this segment matches every path segment `other` matches.
    fn covers(&self, other: &Piece<'_>) -> bool {
        match (self, other) {
            (Piece::Param, Piece::Text(text)) => !text.is_empty(),
            // A mixed segment matches one or more characters, never a `/`,
            // unless a catch-all in it reaches into the segments after.
            (Piece::Param, Piece::Mixed(segment)) => !segment.contains("{*"),
            _ => self == other,
        }
    }
}

/// A pattern as its segments, and whether it ends in a `/{*rest}` catch-all,
/// which the router lets match zero or more further segments (`/v1/{*rest}`
/// matches `/v1/` too).
struct Shape<'a> {
    segments: Vec<Piece<'a>>,
    open: bool,
}

impl Shape<'_> {
    fn of(pattern: &str) -> Shape<'_> {
        let path = pattern.strip_prefix('/').unwrap_or(pattern);
        let (path, open) = match path.rsplit_once('/') {
            Some((head, last)) if is_catch_all(last) => (Some(head), true),
            None if is_catch_all(path) => (None, true),
            _ => (Some(path), false),
        };
        Shape {
            segments: path.map_or_else(Vec::new, |p| p.split('/').map(Piece::of).collect()),
            open,
        }
    }

    /// Whether every path `other` matches is matched by `self`.
    fn covers(&self, other: &Shape<'_>) -> bool {
        let pairs_covered = || {
            self.segments
                .iter()
                .zip(&other.segments)
                .all(|(a, b)| a.covers(b))
        };
        if self.open {
            // `self` wants its segments and then at least one more, possibly
            // empty; `other`'s paths have at least its segments and one more
            // when it is open too.
            let fewest = other.segments.len() + usize::from(other.open);
            fewest > self.segments.len() && pairs_covered()
        } else {
            !other.open && self.segments.len() == other.segments.len() && pairs_covered()
        }
    }
}

fn is_catch_all(segment: &str) -> bool {
    segment
        .strip_prefix("{*")
        .and_then(|s| s.strip_suffix('}'))
        .is_some_and(|name| !name.contains(['{', '}']))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, method: Option<Method>, path: &str) -> Route {
        Route {
            name: name.into(),
            method,
            path: path.into(),
            upstream: 0,
            cost: None,
            estimate: crate::llm::estimate::EstimateRules {
                default_max_tokens: 1,
                image_tokens: 1,
            },
            completion_bound: crate::llm::CompletionBound::AsSent,
            on_store_error: None,
            refund_statuses: None,
            metrics: Default::default(),
        }
    }

    fn router() -> Router {
        Router::new(
            &[
                route(
                    "execute",
                    Some(Method::POST),
                    "/api/v1/playbooks/{id}/execute",
                ),
                route(
                    "members",
                    Some(Method::DELETE),
                    "/api/v1/orgs/{org}/members/{member}",
                ),
                route("everything-else", None, "/{*rest}"),
            ],
            PathRules::default(),
        )
    }

    fn name(method: Method, path: &str) -> Option<String> {
        router().find(&method, path).map(|r| r.name.to_string())
    }

    #[test]
    fn matches_method_and_path_parameters() {
        assert_eq!(
            name(Method::POST, "/api/v1/playbooks/pb_1/execute").as_deref(),
            Some("execute")
        );
        assert_eq!(
            name(Method::DELETE, "/api/v1/orgs/o/members/m").as_deref(),
            Some("members")
        );
    }

    #[test]
    fn a_catch_all_matches_its_own_prefix() {
        assert_eq!(name(Method::GET, "/").as_deref(), Some("everything-else"));
        let router = Router::new(&[route("v1", None, "/v1/{*rest}")], PathRules::default());
        assert!(router.find(&Method::GET, "/v1/").is_some());
        assert!(router.find(&Method::GET, "/v2/").is_none());
    }

    #[test]
    fn another_method_falls_through_to_the_next_route() {
        assert_eq!(
            name(Method::GET, "/api/v1/playbooks/pb_1/execute").as_deref(),
            Some("everything-else")
        );
    }

    #[test]
    fn routes_are_tried_in_config_order() {
        let router = Router::new(
            &[
                route("first", None, "/{*rest}"),
                route("second", None, "/exact"),
            ],
            PathRules::default(),
        );
        assert_eq!(
            router.find(&Method::GET, "/exact").map(|r| &*r.name),
            Some("first")
        );
    }

    #[test]
    fn no_route_matches_outside_the_patterns() {
        let router = Router::new(
            &[route("only", Some(Method::POST), "/v1/messages")],
            PathRules::default(),
        );
        assert!(router.find(&Method::POST, "/v1/other").is_none());
        assert!(router.find(&Method::GET, "/v1/messages").is_none());
    }

    fn metered(name: &str, method: Option<Method>, path: &str) -> Route {
        Route {
            cost: Some(Cost {
                fixed: Amounts::ZERO.with(crate::quota::Dimension::PlaybookRuns, 1),
                estimate_tokens: false,
            }),
            ..route(name, method, path)
        }
    }

    fn metering_router(case: PathCase) -> Router {
        let rules = PathRules {
            case,
            ..PathRules::default()
        };
        Router::new(
            &[
                metered(
                    "execute",
                    Some(Method::POST),
                    "/api/v1/playbooks/{id}/execute",
                ),
                metered("upper", Some(Method::POST), "/v1/Reports/"),
                route("status", None, "/api/v1/playbooks/{id}/status"),
                route("everything-else", None, "/{*rest}"),
            ],
            rules,
        )
    }

    /// What [`Router::find`] answers, by trying every route in config order.
    fn find_by_trying_all(router: &Router, method: &Method, path: &str) -> Option<String> {
        let exact = router
            .routes
            .iter()
            .find(|entry| entry.allows(method) && entry.exact.at(path).is_ok());
        if let Some(entry) = exact.filter(|entry| entry.route.cost.is_some()) {
            return Some(entry.route.name.to_string());
        }
        let key = loose_key(path, router.rules.case);
        let key_differs = matches!(key, Cow::Owned(_));
        router
            .routes
            .iter()
            .find(|entry| entry.allows(method) && entry.matches_loosely(path, &key, key_differs))
            .or(exact)
            .map(|entry| entry.route.name.to_string())
    }

    proptest::proptest! {
        #[test]
        fn the_index_finds_the_route_that_trying_every_route_in_order_finds(
            patterns in proptest::collection::vec(
                (proptest::bool::ANY, proptest::bool::ANY,
                 proptest::collection::vec(
                    proptest::sample::select(vec!["a", "B", "b", "{x}", "v1", ""]), 0..4),
                 proptest::bool::ANY),
                1..12),
            paths in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(vec!["a", "A", "b", "B", "v1", "V1", "z", ""]), 0..5),
                1..20),
            sensitive in proptest::bool::ANY,
        ) {
            let routes: Vec<Route> = patterns
                .iter()
                .enumerate()
                .map(|(i, (is_metered, post_only, segments, catch_all))| {
                    let mut path = format!("/{}", segments.join("/"));
                    if *catch_all {
                        path = format!("{}/{{*rest}}", path.trim_end_matches('/'));
                    }
                    let method = post_only.then_some(Method::POST);
                    let name = format!("r{i}");
                    if *is_metered { metered(&name, method, &path) } else { route(&name, method, &path) }
                })
                .filter(|route| check_pattern(&route.path).is_ok())
                .collect();
            let case = if sensitive { PathCase::Sensitive } else { PathCase::Insensitive };
            let router = Router::new(&routes, PathRules { case, ..PathRules::default() });
            for segments in &paths {
                let path = format!("/{}", segments.join("/"));
                for method in [Method::GET, Method::POST] {
                    proptest::prop_assert_eq!(
                        found(&router, method.clone(), &path),
                        find_by_trying_all(&router, &method, &path),
                        "{} {}", method, path
                    );
                }
            }
        }
    }

    fn found(router: &Router, method: Method, path: &str) -> Option<String> {
        router.find(&method, path).map(|r| r.name.to_string())
    }

    #[test]
    fn a_path_differing_from_a_metered_route_in_case_or_a_trailing_slash_is_metered_by_it() {
        let router = metering_router(PathCase::Insensitive);
        for (path, expected) in [
            ("/API/v1/playbooks/pb1/execute", "execute"),
            ("/api/v1/playbooks/pb1/EXECUTE", "execute"),
            ("/api/v1/playbooks/PB1/execute/", "execute"),
            ("/v1/reports", "upper"),
            ("/V1/REPORTS/", "upper"),
            ("/v1/Reports", "upper"),
        ] {
            assert_eq!(
                found(&router, Method::POST, path).as_deref(),
                Some(expected),
                "{path}"
            );
        }
        // The method still has to match.
        assert_eq!(
            found(&router, Method::GET, "/API/v1/playbooks/pb1/execute").as_deref(),
            Some("everything-else")
        );
    }

    #[test]
    fn under_sensitive_path_case_only_a_trailing_slash_is_tolerated() {
        let router = metering_router(PathCase::Sensitive);
        assert_eq!(
            found(&router, Method::POST, "/api/v1/playbooks/pb1/execute/").as_deref(),
            Some("execute")
        );
        assert_eq!(
            found(&router, Method::POST, "/v1/Reports").as_deref(),
            Some("upper")
        );
        for path in ["/API/v1/playbooks/pb1/execute", "/v1/reports/"] {
            assert_eq!(
                found(&router, Method::POST, path).as_deref(),
                Some("everything-else"),
                "{path}"
            );
        }
    }

    #[test]
    fn an_unmetered_route_keeps_the_paths_it_matches_exactly_and_only_those() {
        let router = Router::new(
            &[
                route("unmetered", None, "/a/{x}/c"),
                metered("metered", None, "/a/b/{y}"),
            ],
            PathRules::default(),
        );
        assert_eq!(
            found(&router, Method::GET, "/a/b/c").as_deref(),
            Some("unmetered")
        );
        assert_eq!(
            found(&router, Method::GET, "/a/B/c").as_deref(),
            Some("metered")
        );
        assert_eq!(
            found(&router, Method::GET, "/a/b/x").as_deref(),
            Some("metered")
        );
    }

    fn request(method: &str, target: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(target)
            .header("x-http-method-override", "PUT")
            .body(())
            .unwrap()
    }

    #[test]
    fn a_request_is_routed_and_forwarded_with_its_normal_path_and_its_query_unchanged() {
        let router = metering_router(PathCase::Insensitive);
        let mut sent = request("POST", "//api/v1/x/../playbooks/pb1/%65xecute?a=%2F&b=..");
        let route = router.route(&mut sent).unwrap().map(|r| r.name.to_string());
        assert_eq!(route.as_deref(), Some("execute"));
        assert_eq!(sent.uri(), "/api/v1/playbooks/pb1/execute?a=%2F&b=..");
        assert!(sent.headers().get("x-http-method-override").is_none());

        let mut sent = request("GET", "http://gateway.example/a/./b");
        router.route(&mut sent).unwrap();
        assert_eq!(sent.uri(), "http://gateway.example/a/b");
    }

    #[test]
    fn an_ambiguous_path_or_a_miscased_method_is_refused_before_routing() {
        let router = metering_router(PathCase::Insensitive);
        let mut sent = request("POST", "/api/v1/playbooks/pb1%2Fexecute");
        assert!(matches!(
            router.route(&mut sent),
            Err(TargetError::Path(PathError::Ambiguous(
                Ambiguity::EncodedSlash
            )))
        ));
        let mut sent = request("post", "/api/v1/playbooks/pb1/execute");
        assert!(matches!(
            router.route(&mut sent),
            Err(TargetError::MethodCase(Method::POST))
        ));
    }

    #[test]
    fn a_forwarded_ambiguous_path_is_routed_as_decoded() {
        let rules = PathRules {
            ambiguous: AmbiguousPaths::Forward,
            case: PathCase::Insensitive,
        };
        let router = Router::new(
            &[
                metered("execute", Some(Method::POST), "/playbooks/{id}/execute"),
                route("everything-else", None, "/{*rest}"),
            ],
            rules,
        );
        let mut sent = request("POST", "/playbooks/pb1%2fexecute");
        let route = router.route(&mut sent).unwrap().map(|r| r.name.to_string());
        assert_eq!(route.as_deref(), Some("execute"));
        assert_eq!(sent.uri(), "/playbooks/pb1%2Fexecute");
    }

    fn shadows(earlier: (Option<Method>, &str), later: (Option<Method>, &str)) -> bool {
        super::shadows((earlier.0.as_ref(), earlier.1), (later.0.as_ref(), later.1))
    }

    #[test]
    fn a_catch_all_shadows_every_route_after_it() {
        for later in [
            "/",
            "/exact",
            "/v1/{*rest}",
            "/{id}",
            "/img-{id}.png",
            "/a/b/",
        ] {
            assert!(shadows((None, "/{*rest}"), (None, later)), "{later}");
            assert!(shadows((None, "/{*rest}"), (Some(Method::GET), later)));
        }
    }

    #[test]
    fn a_parameter_shadows_a_static_segment_in_its_place() {
        assert!(shadows((None, "/users/{id}"), (None, "/users/me")));
        assert!(shadows(
            (None, "/orgs/{org}/members"),
            (Some(Method::GET), "/orgs/acme/members")
        ));
        assert!(!shadows((None, "/users/{id}"), (None, "/users/me/keys")));
        assert!(!shadows((None, "/users/{id}"), (None, "/users/")));
    }

    #[test]
    fn the_same_pattern_twice_shadows_even_with_other_parameter_names() {
        assert!(shadows((None, "/v1/messages"), (None, "/v1/messages")));
        assert!(shadows((None, "/a/{x}/b"), (None, "/a/{y}/b")));
        assert!(shadows((None, "/img-{id}.png"), (None, "/img-{id}.png")));
    }

    #[test]
    fn a_route_for_another_method_or_for_one_method_shadows_nothing_wider() {
        let post = Some(Method::POST);
        assert!(!shadows(
            (post.clone(), "/{*rest}"),
            (Some(Method::GET), "/a")
        ));
        assert!(!shadows((post.clone(), "/{*rest}"), (None, "/a")));
        assert!(shadows((post.clone(), "/{*rest}"), (post, "/a")));
    }

    #[test]
    fn a_static_segment_before_a_parameter_leaves_the_parameter_reachable() {
        assert!(!shadows((None, "/users/me"), (None, "/users/{id}")));
        assert!(!shadows((None, "/v1/"), (None, "/v1/{*rest}")));
        assert!(!shadows((None, "/v1/{id}"), (None, "/v1/{*rest}")));
    }

    #[test]
    fn a_catch_all_shadows_its_own_prefix_and_everything_below_it() {
        assert!(shadows((None, "/v1/{*rest}"), (None, "/v1/")));
        assert!(shadows(
            (None, "/v1/{*rest}"),
            (None, "/v1/chat/completions")
        ));
        assert!(shadows((None, "/v1/{*rest}"), (None, "/v1/{id}/{*rest}")));
        assert!(!shadows((None, "/v1/{*rest}"), (None, "/v1")));
        assert!(!shadows((None, "/v1/{*rest}"), (None, "/v2/x")));
        assert!(!shadows((None, "/v1/{id}/{*rest}"), (None, "/v1/{*rest}")));
    }

    #[test]
    fn a_segment_mixing_text_and_a_parameter_shadows_only_itself() {
        assert!(!shadows((None, "/{id}.json"), (None, "/{name}")));
        assert!(!shadows((None, "/{id}.json"), (None, "/a.json")));
        assert!(!shadows((None, "/{id}.json"), (None, "/{x}.json")));
        assert!(shadows((None, "/files/{name}"), (None, "/files/{id}.json")));
        // A catch-all inside a segment reaches past it, where `{name}` cannot.
        assert!(!shadows((None, "/files/{name}"), (None, "/files/v{*rest}")));
        assert!(shadows((None, "/files/{*rest}"), (None, "/files/v{*rest}")));
    }

    #[test]
    fn a_shadowed_route_matches_no_path_the_route_shadowing_it_misses() {
        let patterns = [
            "/",
            "/{*rest}",
            "/v1",
            "/v1/",
            "/v1/{*rest}",
            "/v1/{id}",
            "/v1/{id}/{*rest}",
            "/v1/me",
            "/v1/{id}.json",
            "/v1/v{*rest}",
            "/v1/{{x}}",
            "/v1/a/b",
        ];
        let paths = [
            "/",
            "/v1",
            "/v1/",
            "/v1/me",
            "/v1/x.json",
            "/v1/v",
            "/v1/vx/y",
            "/v1/{x}",
            "/v1/a/b",
            "/v1/a/",
            "/v1//",
            "/v1/me/x",
            "/v2/a",
        ];
        let mut shadowed = 0;
        for earlier in patterns {
            for later in patterns {
                if !shadows((None, earlier), (None, later)) {
                    continue;
                }
                shadowed += 1;
                let both = Router::new(&[route("earlier", None, earlier)], PathRules::default());
                let only = Router::new(&[route("later", None, later)], PathRules::default());
                for path in paths {
                    let later_matches = only.find(&Method::GET, path).is_some();
                    let earlier_matches = both.find(&Method::GET, path).is_some();
                    assert!(
                        !later_matches || earlier_matches,
                        "{earlier} shadows {later}, yet only {later} matches {path}"
                    );
                }
            }
        }
        assert!(
            shadowed > patterns.len(),
            "only {shadowed} pairs were tried"
        );
    }

    #[test]
    fn an_express_style_parameter_is_rejected_with_the_braced_pattern() {
        let message = check_pattern("/users/:id/keys/:").unwrap_err();
        assert!(message.contains("express-style"), "{message}");
        assert!(
            message.ends_with(r#"write "/users/{id}/keys/{param}""#),
            "{message}"
        );
        assert!(check_pattern("/users/a:b").is_ok());
    }

    #[test]
    fn bad_patterns_are_explained() {
        assert!(
            check_pattern("no-slash")
                .unwrap_err()
                .contains("must start with '/'")
        );
        assert!(check_pattern("/a/{unclosed").is_err());
        assert!(check_pattern("/v1/{*rest}").is_ok());
    }
}
