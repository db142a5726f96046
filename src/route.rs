//! Step 2: method + path to a configured route.
//!
//! Routes are tried in config order and the first whose method and path
//! match wins, so a catch-all placed last never shadows the routes above it.
//! Each route's path is a `matchit` pattern (`{param}`, `{*rest}`).

use std::sync::Arc;

use http::Method;

use crate::config::Route;

pub struct Router {
    routes: Vec<(matchit::Router<()>, Arc<Route>)>,
}

impl Router {
    /// Builds the router from validated routes, whose patterns
    /// [`check_pattern`] has accepted.
    pub fn new(config: &[Route]) -> Router {
        let routes = config
            .iter()
            .filter_map(|route| {
                let mut matcher = matchit::Router::new();
                matcher.insert(route.path.as_str(), ()).ok()?;
                // A trailing catch-all needs at least one character in matchit;
                // `/{*rest}` must also match `/` itself.
                if let Some(at) = route.path.find("{*") {
                    let _ = matcher.insert(&route.path[..at], ());
                }
                Some((matcher, Arc::new(route.clone())))
            })
            .collect();
        Router { routes }
    }

    pub fn find(&self, method: &Method, path: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|(matcher, route)| {
                route.method.as_ref().is_none_or(|m| m == method) && matcher.at(path).is_ok()
            })
            .map(|(_, route)| route)
    }
}

/// Whether `pattern` is a path pattern the router accepts.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if !pattern.starts_with('/') {
        return Err(format!("{pattern:?} must start with '/'"));
    }
    matchit::Router::new()
        .insert(pattern, ())
        .map_err(|e| format!("{pattern:?} is not a valid path pattern: {e}"))
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
        }
    }

    fn router() -> Router {
        Router::new(&[
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
        ])
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
        let router = Router::new(&[route("v1", None, "/v1/{*rest}")]);
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
        let router = Router::new(&[
            route("first", None, "/{*rest}"),
            route("second", None, "/exact"),
        ]);
        assert_eq!(
            router.find(&Method::GET, "/exact").map(|r| &*r.name),
            Some("first")
        );
    }

    #[test]
    fn no_route_matches_outside_the_patterns() {
        let router = Router::new(&[route("only", Some(Method::POST), "/v1/messages")]);
        assert!(router.find(&Method::POST, "/v1/other").is_none());
        assert!(router.find(&Method::GET, "/v1/messages").is_none());
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
