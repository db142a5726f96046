//! Configuration, in two stages: `raw` deserializes the TOML file as
//! written (collecting unknown keys), `validate` turns it into the typed
//! runtime [`Config`] below. Every problem of both stages is reported at
//! once, each with its key path and line.

mod raw;
mod schema;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::org::{OrgDirectory, OrgId};
use crate::route::{PathRules, Route};
use crate::store::OnStoreError;
use crate::store::RedisTarget;
use crate::usage_link::SigningKey;

/// The validated configuration the gateway runs on.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub identity: Vec<IdentitySource>,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    pub orgs: OrgDirectory,
    /// The admin listener, when `[admin]` is configured.
    pub admin: Option<AdminConfig>,
    /// The customers' usage page on the main listener, when `[usage_page]`
    /// is configured.
    pub usage_page: Option<UsagePageConfig>,
}

/// `[usage_page]`: where the signed-link usage page is served, and the
/// secret its links are signed with.
#[derive(Clone, Debug)]
pub struct UsagePageConfig {
    /// Starts with `/` and matches no configured route.
    pub path: String,
    pub secret: SigningKey,
    /// An http or https URL, for the page's "Upgrade" button.
    pub upgrade_url: Option<String>,
}

/// `[admin]`: where the operations API listens, and who may use it.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub tokens: Vec<AdminToken>,
}

/// A bearer token for the admin API, known only by its sha256.
#[derive(Clone, Debug)]
pub struct AdminToken {
    pub sha256: Redacted<[u8; 32]>,
    pub name: String,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Threads serving connections, each with a runtime of its own.
    pub workers: usize,
    pub max_body_bytes: u64,
    pub upstream_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// A connection must make its first request within this of being
    /// accepted.
    pub header_read_timeout: Duration,
    /// A metered request's body must arrive within this, or 408; any
    /// request body that sends nothing for this long is cut (408).
    pub body_read_timeout: Duration,
    /// Open client connections past this are closed at once; `None`: derived
    /// from the descriptor limit at start.
    pub max_connections: Option<usize>,
    /// A connection with no request in flight for this long is closed.
    pub keepalive_timeout: Duration,
    /// How request paths are read before routing.
    pub paths: PathRules,
    /// One log line per request (target `tollgate::access`).
    pub access_log: bool,
    /// `[server.tls]`: the listener terminates TLS.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`, read and checked when the file is loaded, so that a
/// reload reads the certificate and key again.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// The certificate chain and key, with the protocol versions and ALPN;
    /// redacted, for the key in it.
    pub server: Redacted<Arc<rustls::ServerConfig>>,
    /// A connection that has not finished its handshake by then is closed.
    pub handshake_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub backend: Backend,
    pub key_prefix: String,
    pub timeout: Duration,
    pub on_error: OnStoreError,
    /// How long a settlement the store did not confirm is retried.
    pub settle_retry_for: Duration,
    /// How many settlements may wait to be retried at once.
    pub max_pending_settlements: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    /// Its URLs may hold a password, so `Debug` shows only the kind.
    Redis(Redacted<RedisTarget>),
}

/// A value that `Debug` never shows, for config that may hold a secret.
#[derive(Clone)]
pub struct Redacted<T>(pub T);

impl<T: PartialEq> PartialEq for Redacted<T> {
    fn eq(&self, other: &Redacted<T>) -> bool {
        self.0 == other.0
    }
}

impl<T: Eq> Eq for Redacted<T> {}

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// One way of learning the org, tried in configured order.
#[derive(Clone, Debug)]
pub enum IdentitySource {
    ApiKey(ApiKeys),
    Jwt(Arc<JwtConfig>),
    Header(HeaderSource),
}

/// An org header set by an auth layer in front of the gateway, believed
/// only from that layer's addresses.
#[derive(Clone, Debug)]
pub struct HeaderSource {
    pub name: HeaderName,
    pub trusted_peers: Vec<ipnet::IpNet>,
}

impl HeaderSource {
    /// Whether the header may be believed from `peer`, the TCP peer.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted_peers.iter().any(|net| net.contains(&peer))
    }
}

/// How bearer JWTs are verified and where the org is read from.
#[derive(Clone, Debug)]
pub struct JwtConfig {
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// For HS256 (and the other HMAC algorithms).
    pub hmac_secret: Option<Redacted<jsonwebtoken::DecodingKey>>,
    /// For RS256, ES256 and the other public-key algorithms, from `jwks_file`.
    pub public_keys: Redacted<Vec<PublicKey>>,
    /// The dotted `org_claim`, split: `["app_metadata", "org_id"]`.
    pub org_claim: Vec<String>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway: Duration,
}

#[derive(Clone)]
pub struct PublicKey {
    pub kid: Option<String>,
    pub family: jsonwebtoken::AlgorithmFamily,
    pub key: jsonwebtoken::DecodingKey,
}

#[derive(Clone, Debug)]
pub struct ApiKeys {
    /// The configured header; `x-api-key` is read as well.
    pub header: HeaderName,
    pub keys: Vec<ApiKey>,
}

/// A gateway API key, known only by its digest.
#[derive(Clone, Debug)]
pub struct ApiKey {
    pub sha256: [u8; 32],
    pub org: OrgId,
    pub name: String,
}

#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: String,
    /// Scheme and authority that requests are sent to.
    pub origin: Uri,
    /// Prepended to the request path; empty or starting with `/`, never
    /// ending with one.
    pub path_prefix: String,
    /// Set on every forwarded request, replacing what the client sent.
    /// The values are marked sensitive, so `Debug` redacts them.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Trusted for this upstream besides the webpki roots (`ca_file`).
    pub extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
}

/// The completion bound for estimate routes that name none.
pub const DEFAULT_MAX_TOKENS: i64 = 4096;

/// What one image in a prompt counts, unless a route says otherwise: about
/// the most either provider bills for one image at its largest size.
pub const DEFAULT_IMAGE_TOKENS: i64 = 1600;

/// The smallest completion a `fit` route lowers its bound to, unless it
/// says otherwise.
pub const DEFAULT_MIN_COMPLETION_TOKENS: i64 = 256;

impl Config {
    /// Reads and validates a config file, taking `${NAME}` from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &|name| std::env::var(name).ok())
    }

    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string(), env)
    }

    /// Validates config text; `origin` names it in error messages.
    pub fn parse(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            file: origin.to_string(),
            problems,
        };
        let document = DeTable::parse(text).map_err(|e| {
            invalid(vec![Problem {
                path: KeyPath::root(),
                line: line_of(text, e.span()),
                message: e.message().into(),
            }])
        })?;
        let (raw, mut problems) = deserialize(&document, text);
        if let Some(raw) = raw {
            match validate::validate(raw, env) {
                Ok(config) if problems.is_empty() => return Ok(config),
                Ok(_) => {}
                Err(found) => problems.extend(found),
            }
        }
        for problem in &mut problems {
            if problem.line.is_none() {
                problem.line = problem
                    .path
                    .span_in(&document)
                    .and_then(|s| line_of(text, Some(s)));
            }
        }
        // Stable, so problems on one line keep the order they were found in.
        problems.sort_by_key(|p| (p.line.is_none(), p.line));
        Err(invalid(problems))
    }

    /// A one-line summary for logs and `check`, with no secret in it.
    pub fn summary(&self) -> String {
        let admin = match &self.admin {
            Some(admin) => format!(", admin on {}", admin.listen),
            None => String::new(),
        };
        let tls = match &self.server.tls {
            Some(_) => " (TLS)",
            None => "",
        };
        format!(
            "listen {}{tls}{admin}, store {}, {} upstreams, {} routes ({} metered), {} orgs configured",
            self.server.listen,
            match &self.store.backend {
                Backend::Memory => "memory",
                Backend::Redis(Redacted(RedisTarget::Single(_))) => "redis",
                Backend::Redis(Redacted(RedisTarget::Cluster(_))) => "redis cluster",
            },
            self.upstreams.len(),
            self.routes.len(),
            self.routes.iter().filter(|r| r.cost.is_some()).count(),
            self.orgs.known().count(),
        )
    }
}

/// The raw config, with every unknown key as a problem. A value of the wrong
/// type stops serde where it stands, so it is reported, cut from the document
/// and the rest read again, to report every unknown key and wrong type; the
/// config is then `None`, as what is left is not the file to validate.
fn deserialize(
    document: &Spanned<DeTable<'_>>,
    text: &str,
) -> (Option<raw::RawConfig>, Vec<Problem>) {
    let schema = schema::Schema::of::<raw::RawConfig>();
    let mut document = document.clone();
    let mut problems = Vec::new();
    let mut cuts: Vec<KeyPath> = Vec::new();
    loop {
        let e = match read_once(&document, &schema, &mut problems) {
            Ok(raw) => return (cuts.is_empty().then_some(raw), problems),
            Err(e) => e,
        };
        let path = KeyPath::from_serde(e.path());
        // A table missing a key that was cut from it is no news.
        if !cuts.iter().any(|cut| cut.0.starts_with(&path.0)) {
            problems.push(Problem {
                path: path.clone(),
                line: line_of(text, e.inner().span()),
                message: e.inner().message().to_string(),
            });
        }
        if !path.cut_from(&mut document) {
            return (None, problems);
        }
        cuts.push(path);
    }
}

/// One pass of serde over `document`, adding the unknown keys it meets.
fn read_once(
    document: &Spanned<DeTable<'_>>,
    schema: &schema::Schema,
    problems: &mut Vec<Problem>,
) -> Result<raw::RawConfig, serde_path_to_error::Error<toml::de::Error>> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(KeyPath::from_ignored(&path));
    let result = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        toml::de::Deserializer::from(document.clone()),
        &mut record,
    ));
    for path in unknown {
        let problem = unknown_key(path, schema);
        // Each pass meets again the unknown keys the passes before it met.
        if !problems.contains(&problem) {
            problems.push(problem);
        }
    }
    result
}

fn unknown_key(path: KeyPath, schema: &schema::Schema) -> Problem {
    let message = match path.0.split_last() {
        Some((Segment::Key(key), table)) => schema::unknown_key(key, schema.keys_at(table)),
        _ => "not a key of the config".to_string(),
    };
    Problem {
        path,
        line: None,
        message,
    }
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", render_problems(file, problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

/// One thing wrong with a config, at one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: KeyPath,
    pub line: Option<usize>,
    pub message: String,
}

fn render_problems(file: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| {
            let at = p
                .line
                .map(|l| format!("{file}:{l}"))
                .unwrap_or_else(|| file.to_string());
            if p.path.is_root() {
                format!("{at}: {}", p.message)
            } else {
                format!("{at}: {}: {}", p.path, p.message)
            }
        })
        .collect();
    lines.join("\n")
}

/// 1-based line of a byte offset.
fn line_of(text: &str, span: Option<Range<usize>>) -> Option<usize> {
    let start = span?.start.min(text.len());
    Some(
        text.as_bytes()[..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1,
    )
}

/// Where a key sits in the document: `routes[2].cost.tokens`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Segment>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    fn root() -> KeyPath {
        KeyPath(Vec::new())
    }

    fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    fn key(&self, key: &str) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_string()));
        path
    }

    fn index(&self, index: usize) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }

    fn from_serde(path: &serde_path_to_error::Path) -> KeyPath {
        use serde_path_to_error::Segment as S;
        KeyPath(
            path.iter()
                .filter_map(|segment| match segment {
                    S::Seq { index } => Some(Segment::Index(*index)),
                    S::Map { key } | S::Enum { variant: key } => Some(Segment::Key(key.clone())),
                    S::Unknown => None,
                })
                .collect(),
        )
    }

    fn from_ignored(path: &serde_ignored::Path<'_>) -> KeyPath {
        use serde_ignored::Path as P;
        let (parent, segment) = match path {
            P::Root => return KeyPath::root(),
            P::Seq { parent, index } => (parent, Some(Segment::Index(*index))),
            P::Map { parent, key } => (parent, Some(Segment::Key(key.clone()))),
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                (parent, None)
            }
        };
        let mut keys = KeyPath::from_ignored(parent);
        keys.0.extend(segment);
        keys
    }

    /// Removes the key this path names from `document`; a path ending in an
    /// array element removes the whole array, so that the elements after it
    /// keep their index. False when there is no such key.
    fn cut_from(&self, document: &mut Spanned<DeTable<'_>>) -> bool {
        let end = self.0.iter().rposition(|s| matches!(s, Segment::Key(_)));
        end.is_some_and(|end| remove_key(document.get_mut(), &self.0[..=end]))
    }

    /// The span of the deepest part of this path present in `document`, so
    /// that a bad value points at its line and a missing key at its table.
    fn span_in(&self, document: &Spanned<DeTable<'_>>) -> Option<Range<usize>> {
        let mut span = None;
        let mut value: Option<&DeValue<'_>> = None;
        let mut table = Some(document.get_ref());
        for segment in &self.0 {
            let next = match (segment, table, value) {
                (Segment::Key(key), Some(t), _) => t.get(key.as_str()),
                (Segment::Index(i), _, Some(DeValue::Array(items))) => items.get(*i),
                _ => None,
            };
            let Some(next) = next else { break };
            span = Some(next.span());
            value = Some(next.get_ref());
            table = match next.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        span
    }
}

fn remove_key(table: &mut DeTable<'_>, path: &[Segment]) -> bool {
    match path {
        [Segment::Key(key)] => table.remove(key.as_str()).is_some(),
        [Segment::Key(key), rest @ ..] => table
            .get_mut(key.as_str())
            .is_some_and(|value| remove_key_in(value.get_mut(), rest)),
        _ => false,
    }
}

fn remove_key_in(value: &mut DeValue<'_>, path: &[Segment]) -> bool {
    match (value, path) {
        (DeValue::Table(table), _) => remove_key(table, path),
        (DeValue::Array(items), [Segment::Index(i), rest @ ..]) => items
            .get_mut(*i)
            .is_some_and(|item| remove_key_in(item.get_mut(), rest)),
        _ => false,
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(key)?
                    } else {
                        write!(f, "{key:?}")?
                    }
                }
            }
        }
        Ok(())
    }
}

/// Replaces each `${NAME}` in `text` with the variable's value.
fn expand_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "`${` without a closing `}`".to_string())?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{name}}}` is not an environment variable name"));
        }
        out.push_str(&env(name).ok_or_else(|| format!("environment variable {name} is not set"))?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A self-signed certificate for `localhost` and its key, written as PEM
/// to `dir`, and the `[server.tls]` section naming them.
#[cfg(test)]
pub(crate) fn test_tls_section(dir: &Path) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    format!(
        "[server.tls]\ncert = {:?}\nkey = {:?}\n",
        cert_file.display().to_string(),
        key_file.display().to_string()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cret".to_string())
    }

    #[test]
    fn env_references_are_replaced_anywhere_in_a_string() {
        assert_eq!(
            expand_env("Bearer ${TOKEN}!", &env).unwrap(),
            "Bearer s3cret!"
        );
        assert_eq!(expand_env("no references", &env).unwrap(), "no references");
    }

    #[test]
    fn an_unset_variable_is_an_error_naming_it() {
        assert_eq!(
            expand_env("${MISSING}", &env).unwrap_err(),
            "environment variable MISSING is not set"
        );
        assert!(expand_env("${TOKEN", &env).is_err());
    }

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, "t.toml", &env) {
            Err(ConfigError::Invalid { problems, .. }) => problems
                .iter()
                .map(|p| format!("{}: {}: {}", p.line.unwrap_or(0), p.path, p.message))
                .collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_reported_with_the_semantic_problems_in_line_order() {
        let found = problems(
            "[[routes]]\nname = \"a\"\npath = \"/a\"\nupstream = \"api\"\n\
             [server]\nworkers = 0\nlisten_on = \"x\"\n",
        );
        assert_eq!(
            found,
            [
                "4: routes[0].upstream: no upstream is named \"api\" under [upstreams]",
                "6: server.workers: must be between 1 and 1024 (got 0)",
                "7: server.listen_on: unknown field `listen_on`; did you mean `listen`?",
            ]
        );
    }

    #[test]
    fn a_connection_limit_below_one_and_a_zero_keepalive_timeout_are_refused() {
        let found = problems("[server]\nmax_connections = 0\nkeepalive_timeout = \"0s\"\n");
        assert_eq!(
            found,
            [
                "2: server.max_connections: must be between 1 and 10000000 (got 0)",
                "3: server.keepalive_timeout: must be longer than zero",
            ]
        );
    }

    #[test]
    fn the_connection_limit_is_left_to_the_descriptor_limit_unless_set() {
        let server = |text: &str| Config::parse(text, "t.toml", &env).unwrap().server;
        let unset = server("");
        assert_eq!(unset.max_connections, None);
        assert_eq!(unset.keepalive_timeout, Duration::from_secs(75));
        let set = server("[server]\nmax_connections = 500\nkeepalive_timeout = \"5s\"\n");
        assert_eq!(set.max_connections, Some(500));
        assert_eq!(set.keepalive_timeout, Duration::from_secs(5));
    }

    #[test]
    fn the_access_log_is_off_unless_set() {
        let server = |text: &str| Config::parse(text, "t.toml", &env).unwrap().server;
        assert!(!server("").access_log);
        assert!(server("[server]\naccess_log = true\n").access_log);
    }

    #[test]
    fn the_outbox_retries_ten_minutes_and_holds_a_hundred_thousand_unless_set() {
        let store = |text: &str| Config::parse(text, "t.toml", &env).unwrap().store;
        let unset = store("");
        assert_eq!(unset.on_error, OnStoreError::Allow);
        assert_eq!(unset.settle_retry_for, Duration::from_secs(600));
        assert_eq!(unset.max_pending_settlements, 100_000);
        let set = store(
            "[store]\non_error = \"defer\"\nsettle_retry_for = \"30s\"\n\
             max_pending_settlements = 5\n",
        );
        assert_eq!(set.on_error, OnStoreError::Defer);
        assert_eq!(set.settle_retry_for, Duration::from_secs(30));
        assert_eq!(set.max_pending_settlements, 5);
    }

    #[test]
    fn an_empty_outbox_a_zero_retry_window_and_an_unknown_policy_are_refused() {
        let found = problems(
            "[store]\nmax_pending_settlements = 0\nsettle_retry_for = \"0s\"\n\
             on_error = \"later\"\n",
        );
        assert_eq!(
            found,
            [
                "2: store.max_pending_settlements: must be between 1 and 5000000 (got 0)",
                "3: store.settle_retry_for: must be longer than zero",
                "4: store.on_error: \"later\": use \"allow\", \"deny\" or \"defer\"",
            ]
        );
    }

    #[test]
    fn every_wrong_type_is_reported_with_every_unknown_key_but_nothing_is_validated() {
        let found = problems(
            "[server]\nworkers = \"two\"\ncolour = 1\nmax_body_bytes = -1\n\
             [orgs.o]\nlimits = { tokens = \"lots\" }\nplann = \"free\"\n",
        );
        assert_eq!(
            found,
            [
                "2: server.workers: invalid type: string \"two\", expected i64",
                "3: server.colour: unknown field `colour`, expected one of `listen`, \
                 `max_body_bytes`, `upstream_timeout`, `idle_timeout`, `shutdown_grace`, \
                 `header_read_timeout`, `body_read_timeout`, `ambiguous_paths`, `path_case`, \
                 `workers`, `max_connections`, `keepalive_timeout`, `access_log`, `tls`",
                "6: orgs.o.limits.tokens: invalid type: string \"lots\", expected i64",
                "7: orgs.o.plann: unknown field `plann`; did you mean `plan`?",
            ]
        );
    }

    #[test]
    fn a_wrong_type_inside_an_array_cuts_only_that_key() {
        let found = problems(
            "[[routes]]\nname = \"a\"\npath = \"/a\"\nupstream = \"api\"\n\
             refund_statuses = [\"x\"]\n[[routes]]\nname = 5\npath = \"/b\"\nupstream = \"api\"\n",
        );
        assert_eq!(
            found,
            [
                "5: routes[0].refund_statuses[0]: invalid type: string \"x\", expected i64",
                "7: routes[1].name: invalid type: integer `5`, expected a string",
            ]
        );
    }

    #[test]
    fn trusted_peers_take_cidrs_and_bare_ips_meaning_that_address_alone() {
        let text = "[identity.header]\ntrusted_peers = [\"10.0.0.0/8\", \"192.0.2.7\", \"::1\"]\n";
        let config = Config::parse(text, "test.toml", &env).unwrap();
        let Some(IdentitySource::Header(source)) = config.identity.first() else {
            panic!("no header source in {:?}", config.identity);
        };
        for (peer, trusted) in [
            ("10.200.1.1", true),
            ("11.0.0.1", false),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("::1", true),
            ("::2", false),
        ] {
            assert_eq!(source.trusts(peer.parse().unwrap()), trusted, "{peer}");
        }
    }

    #[test]
    fn paths_are_read_strictly_by_default_and_each_rule_takes_its_two_words() {
        use crate::route::{AmbiguousPaths, PathCase};
        let config = Config::parse("", "t.toml", &env).unwrap();
        assert_eq!(config.server.paths.ambiguous, AmbiguousPaths::Reject);
        assert_eq!(config.server.paths.case, PathCase::Insensitive);

        let text = "[server]\nambiguous_paths = \"forward\"\npath_case = \"sensitive\"\n";
        let config = Config::parse(text, "t.toml", &env).unwrap();
        assert_eq!(config.server.paths.ambiguous, AmbiguousPaths::Forward);
        assert_eq!(config.server.paths.case, PathCase::Sensitive);

        let found = problems("[server]\nambiguous_paths = \"decode\"\npath_case = \"lower\"\n");
        assert_eq!(
            found,
            [
                "2: server.ambiguous_paths: \"decode\": use \"reject\" or \"forward\"",
                "3: server.path_case: \"lower\": use \"insensitive\" or \"sensitive\"",
            ]
        );
    }

    #[test]
    fn the_usage_page_needs_a_free_path_and_a_long_secret() {
        let found = problems(
            "[upstreams.api]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nname = \"u\"\npath = \"/usage\"\nupstream = \"api\"\n[usage_page]\npath = \"/usage\"\nsecret = \"short\"\nupgrade_url = \"ftp://x\"\n",
        );
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].contains("usage_page.path: \"/usage\" is also matched by routes[0]"));
        assert!(found[1].contains("usage_page.secret: must be at least 32 bytes"));
        assert!(
            found[2].contains("usage_page.upgrade_url: \"ftp://x\" is not an http or https URL")
        );
        let config = Config::parse(
            &format!(
                "[usage_page]\npath = \"/_tollgate/usage\"\nsecret = \"{}\"\n",
                "s".repeat(32)
            ),
            "t.toml",
            &env,
        )
        .unwrap();
        let page = config.usage_page.unwrap();
        assert_eq!(page.path, "/_tollgate/usage");
        assert_eq!(format!("{:?}", page.secret), "[redacted]");
    }

    #[test]
    fn the_admin_section_needs_an_address_and_tokens_given_as_digests() {
        let found = problems("[admin]\nlisten = \"somewhere\"\n");
        assert_eq!(
            found,
            [
                "1: admin.tokens: name at least one token: everything under /v1/ needs one",
                "2: admin.listen: \"somewhere\" is not an address: write e.g. \"127.0.0.1:9090\"",
            ]
        );
        let found = problems("[admin]\ntokens = [{ sha256 = \"ops\" }, { sha256 = \"ops\" }]\n");
        assert_eq!(
            found,
            [
                "1: admin.listen: missing: the admin listener's address",
                "2: admin.tokens[0].sha256: must be the 64 hex digits of the token's sha256",
                "2: admin.tokens[1].sha256: must be the 64 hex digits of the token's sha256",
            ]
        );
        let digest = "ab".repeat(32);
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:9090\"\ntokens = [{{ sha256 = \"{digest}\", name = \"ops\" }}]\n"
        );
        let config = Config::parse(&text, "t.toml", &env).unwrap();
        let admin = config.admin.unwrap();
        assert_eq!(admin.listen.port(), 9090);
        assert_eq!(admin.tokens[0].name, "ops");
        assert_eq!(
            format!("{:?}", admin.tokens[0]),
            r#"AdminToken { sha256: [redacted], name: "ops" }"#
        );
    }

    #[test]
    fn key_paths_read_as_toml() {
        let path = KeyPath::root()
            .key("routes")
            .index(2)
            .key("cost")
            .key("tokens");
        assert_eq!(path.to_string(), "routes[2].cost.tokens");
        assert_eq!(
            KeyPath::root().key("orgs").key("org.eu").to_string(),
            "orgs.\"org.eu\""
        );
    }

    #[test]
    fn tls_is_built_from_the_files_with_alpn_and_a_ten_second_handshake_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let section = test_tls_section(dir.path());
        let config = Config::parse(&section, "t.toml", &env).unwrap();
        let tls = config.server.tls.unwrap();
        assert_eq!(tls.handshake_timeout, Duration::from_secs(10));
        assert_eq!(tls.server.0.alpn_protocols, [&b"h2"[..], b"http/1.1"]);
        assert!(format!("{tls:?}").contains("server: [redacted]"), "{tls:?}");

        let text = format!("{section}handshake_timeout = \"300ms\"\n");
        let config = Config::parse(&text, "t.toml", &env).unwrap();
        assert_eq!(
            config.server.tls.unwrap().handshake_timeout,
            Duration::from_millis(300)
        );
    }

    #[test]
    fn tls_problems_are_reported_at_their_keys() {
        let found = problems(
            "[server.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"${UNSET}\"\nhandshake_timeout = \"0s\"\n",
        );
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].starts_with("2: server.tls.cert: cannot read \"/nonexistent/cert.pem\": "),
            "{found:?}"
        );
        assert_eq!(
            found[1],
            "3: server.tls.key: environment variable UNSET is not set"
        );
        assert_eq!(
            found[2],
            "4: server.tls.handshake_timeout: must be longer than zero"
        );
        let found = problems("[server.tls]\ncert = \"c.pem\"\n");
        assert_eq!(found, ["1: server.tls: missing field `key`"]);
    }
}
