//! Raw config to runtime config. Every check runs, and every failure is kept,
//! so one `check` shows all that is wrong with a file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Uri};
use ipnet::IpNet;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::raw::{
    RawAdmin, RawAmount, RawConfig, RawJwt, RawRoute, RawServer, RawTls, RawUpstream, RawUsagePage,
};
use super::{
    AdminConfig, AdminToken, ApiKey, ApiKeys, Backend, Config, DEFAULT_IMAGE_TOKENS,
    DEFAULT_MAX_TOKENS, DEFAULT_MIN_COMPLETION_TOKENS, HeaderSource, IdentitySource, JwtConfig,
    KeyPath, Problem, PublicKey, Redacted, ServerConfig, StoreConfig, TlsConfig, Upstream,
    UsagePageConfig, expand_env,
};
use crate::llm::CompletionBound;
use crate::llm::estimate::EstimateRules;
use crate::org::{KnownOrgs, OrgDirectory, OrgId, OrgPolicy};
use crate::quota::{Amounts, Dimension, Limits, MAX_AMOUNT, Mode};
use crate::route::{AmbiguousPaths, Cost, PathCase, PathRules, Route};
use crate::store::OnStoreError;
use crate::store::RedisTarget;
use crate::usage_link::SigningKey;

/// More worker threads than this is a typo, not a machine.
const MAX_WORKERS: i64 = 1024;

/// More connections than this is a typo, not a gateway.
const MAX_CONNECTIONS: i64 = 10_000_000;

struct Checker<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, path: &KeyPath, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.clone(),
            line: None,
            message: message.into(),
        });
    }

    /// The string with `${NAME}` expanded, or a problem.
    fn text(&mut self, path: &KeyPath, raw: &str) -> Option<String> {
        expand_env(raw, self.env)
            .map_err(|message| self.problem(path, message))
            .ok()
    }

    fn parsed<T>(
        &mut self,
        path: &KeyPath,
        raw: Option<&str>,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        let Some(raw) = raw else { return default };
        let Some(text) = self.text(path, raw) else {
            return default;
        };
        parse(&text).unwrap_or_else(|message| {
            self.problem(path, message);
            default
        })
    }

    /// A timeout: longer than zero.
    fn duration(&mut self, path: &KeyPath, raw: Option<&str>, default: Duration) -> Duration {
        self.any_duration(path, raw, default, false)
    }

    fn any_duration(
        &mut self,
        path: &KeyPath,
        raw: Option<&str>,
        default: Duration,
        zero_allowed: bool,
    ) -> Duration {
        self.parsed(path, raw, default, |text| {
            match humantime::parse_duration(text) {
                Ok(duration) if duration.is_zero() && !zero_allowed => {
                    Err("must be longer than zero".to_string())
                }
                // Past a day a timeout is a mistake, and arithmetic on it could overflow.
                Ok(duration) if duration > Duration::from_secs(24 * 60 * 60) => {
                    Err(format!("{text:?} is longer than a day"))
                }
                Ok(duration) => Ok(duration),
                Err(e) => Err(format!(
                    "{text:?} is not a duration ({e}); write e.g. \"250ms\" or \"30s\""
                )),
            }
        })
    }

    fn on_store_error(&mut self, path: &KeyPath, raw: Option<&str>) -> Option<OnStoreError> {
        self.parsed(path, raw, None, |word| match word {
            "allow" => Ok(Some(OnStoreError::Allow)),
            "deny" => Ok(Some(OnStoreError::Deny)),
            "defer" => Ok(Some(OnStoreError::Defer)),
            other => Err(format!("{other:?}: use \"allow\", \"deny\" or \"defer\"")),
        })
    }

    /// The 32 bytes of a sha256 written as 64 hex digits.
    fn sha256(&mut self, path: &KeyPath, raw: &str, what: &str) -> Option<[u8; 32]> {
        let text = self.text(path, raw)?;
        let mut digest = [0u8; 32];
        match hex::decode_to_slice(text.trim(), &mut digest) {
            Ok(()) => Some(digest),
            Err(_) => {
                self.problem(
                    path,
                    format!("must be the 64 hex digits of the {what}'s sha256"),
                );
                None
            }
        }
    }

    fn org_id(&mut self, path: &KeyPath, raw: &str) -> Option<OrgId> {
        let id = OrgId::parse(raw);
        if id.is_none() {
            self.problem(
                path,
                format!("{raw:?} is not a valid org id (1 to 64 of A-Z a-z 0-9 _ - .)"),
            );
        }
        id
    }

    fn mode(&mut self, path: &KeyPath, raw: Option<&str>, default: Mode) -> Mode {
        self.parsed(path, raw, default, |word| {
            Mode::parse(word).ok_or_else(|| {
                format!("{word:?} is not a mode: use \"enforce\", \"shadow\" or \"off\"")
            })
        })
    }

    fn anchor_day(&mut self, path: &KeyPath, raw: Option<i64>, default: u32) -> u32 {
        match raw {
            None => default,
            Some(day @ 1..=31) => day as u32,
            Some(day) => {
                self.problem(path, format!("{day} is not a day of the month (1 to 31)"));
                default
            }
        }
    }

    fn limits(&mut self, path: &KeyPath, raw: &BTreeMap<String, i64>) -> Limits {
        let mut limits = Limits::UNLIMITED;
        for (name, &limit) in raw {
            let path = path.key(name);
            match Dimension::parse(name) {
                None => self.problem(&path, unknown_dimension(name)),
                Some(_) if limit < 0 => {
                    self.problem(&path, format!("a limit cannot be negative (got {limit})"))
                }
                Some(dimension) => limits.set(dimension, Some(limit)),
            }
        }
        limits
    }
}

fn unknown_dimension(name: &str) -> String {
    let known: Vec<_> = Dimension::ALL.iter().map(|d| d.as_str()).collect();
    format!(
        "unknown quota dimension {name:?}: expected one of {}",
        known.join(", ")
    )
}

pub(super) fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<Problem>> {
    let mut c = Checker {
        env,
        problems: Vec::new(),
    };
    let root = KeyPath::default();

    let server = {
        let path = root.key("server");
        let s = &raw.server;
        let listen = c.parsed(
            &path.key("listen"),
            s.listen.as_deref(),
            ([127, 0, 0, 1], 8080).into(),
            |text| {
                text.parse().map_err(|_| {
                    format!("{text:?} is not an address: write e.g. \"127.0.0.1:8080\"")
                })
            },
        );
        let max_body_bytes = match s.max_body_bytes {
            None => 1 << 20,
            Some(n) if n > 0 => n as u64,
            Some(n) => {
                c.problem(
                    &path.key("max_body_bytes"),
                    format!("must be positive (got {n})"),
                );
                1 << 20
            }
        };
        let workers = match s.workers {
            None => std::thread::available_parallelism().map_or(1, usize::from),
            Some(n) if (1..=MAX_WORKERS).contains(&n) => n as usize,
            Some(n) => {
                c.problem(
                    &path.key("workers"),
                    format!("must be between 1 and {MAX_WORKERS} (got {n})"),
                );
                1
            }
        };
        let max_connections = match s.max_connections {
            None => None,
            Some(n) if (1..=MAX_CONNECTIONS).contains(&n) => Some(n as usize),
            Some(n) => {
                c.problem(
                    &path.key("max_connections"),
                    format!("must be between 1 and {MAX_CONNECTIONS} (got {n})"),
                );
                None
            }
        };
        let tls = s
            .tls
            .as_ref()
            .and_then(|raw| validate_tls(&mut c, &path.key("tls"), raw));
        ServerConfig {
            listen,
            workers,
            max_body_bytes,
            upstream_timeout: c.duration(
                &path.key("upstream_timeout"),
                s.upstream_timeout.as_deref(),
                Duration::from_secs(120),
            ),
            idle_timeout: c.duration(
                &path.key("idle_timeout"),
                s.idle_timeout.as_deref(),
                Duration::from_secs(300),
            ),
            shutdown_grace: c.duration(
                &path.key("shutdown_grace"),
                s.shutdown_grace.as_deref(),
                Duration::from_secs(30),
            ),
            header_read_timeout: c.duration(
                &path.key("header_read_timeout"),
                s.header_read_timeout.as_deref(),
                Duration::from_secs(30),
            ),
            body_read_timeout: c.duration(
                &path.key("body_read_timeout"),
                s.body_read_timeout.as_deref(),
                Duration::from_secs(30),
            ),
            max_connections,
            keepalive_timeout: c.duration(
                &path.key("keepalive_timeout"),
                s.keepalive_timeout.as_deref(),
                Duration::from_secs(75),
            ),
            paths: path_rules(&mut c, &path, s),
            access_log: s.access_log.unwrap_or(false),
            tls,
        }
    };

    let store = {
        let path = root.key("store");
        let s = &raw.store;
        let backend = match s.backend.as_deref().unwrap_or("memory") {
            "memory" => {
                for (key, set) in [("url", s.url.is_some()), ("cluster", s.cluster.is_some())] {
                    if set {
                        c.problem(
                            &path.key(key),
                            format!("`{key}` is for backend = \"redis\""),
                        );
                    }
                }
                Backend::Memory
            }
            "redis" => redis_target(&mut c, &path, s.url.as_deref(), s.cluster.as_deref())
                .map_or(Backend::Memory, |target| Backend::Redis(Redacted(target))),
            other => {
                c.problem(
                    &path.key("backend"),
                    format!("{other:?} is not a store backend: use \"memory\" or \"redis\""),
                );
                Backend::Memory
            }
        };
        let key_prefix = c.parsed(
            &path.key("key_prefix"),
            s.key_prefix.as_deref(),
            "tollgate".to_string(),
            |text| {
                let ok = !text.is_empty()
                    && text
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "_-.".contains(ch));
                if ok {
                    Ok(text.to_string())
                } else {
                    Err(format!("{text:?}: use 1 or more of A-Z a-z 0-9 _ - ."))
                }
            },
        );
        StoreConfig {
            backend,
            key_prefix,
            timeout: c.duration(
                &path.key("timeout"),
                s.timeout.as_deref(),
                Duration::from_millis(100),
            ),
            on_error: c
                .on_store_error(&path.key("on_error"), s.on_error.as_deref())
                .unwrap_or(OnStoreError::Allow),
            settle_retry_for: c.duration(
                &path.key("settle_retry_for"),
                s.settle_retry_for.as_deref(),
                Duration::from_secs(10 * 60),
            ),
            max_pending_settlements: pending_bound(
                &mut c,
                &path.key("max_pending_settlements"),
                s.max_pending_settlements,
            ),
        }
    };

    let mode = c.mode(
        &root.key("enforcement").key("mode"),
        raw.enforcement.mode.as_deref(),
        Mode::Enforce,
    );
    let identity = validate_identity(&mut c, &raw);
    let (upstreams, upstream_index) = validate_upstreams(&mut c, &raw.upstreams);
    let routes = validate_routes(&mut c, &raw.routes, &upstream_index);
    if identity.is_empty() && raw.routes.iter().any(|r| r.cost.is_some()) {
        c.problem(
            &root.key("identity").key("sources"),
            "metered routes need an identity source: configure [identity.api_key], [identity.jwt] or [identity.header]",
        );
    }
    let orgs = validate_orgs(&mut c, &raw, mode);
    let admin = raw.admin.as_ref().map(|raw| validate_admin(&mut c, raw));
    let usage_page = raw
        .usage_page
        .as_ref()
        .and_then(|page| validate_usage_page(&mut c, page, &raw.routes));

    if c.problems.is_empty() {
        Ok(Config {
            server,
            store,
            identity,
            upstreams,
            routes,
            orgs,
            admin,
            usage_page,
        })
    } else {
        Err(c.problems)
    }
}

/// `[server] ambiguous_paths` and `path_case`.
fn path_rules(c: &mut Checker<'_>, path: &KeyPath, s: &RawServer) -> PathRules {
    let defaults = PathRules::default();
    PathRules {
        ambiguous: c.parsed(
            &path.key("ambiguous_paths"),
            s.ambiguous_paths.as_deref(),
            defaults.ambiguous,
            |word| match word {
                "reject" => Ok(AmbiguousPaths::Reject),
                "forward" => Ok(AmbiguousPaths::Forward),
                other => Err(format!("{other:?}: use \"reject\" or \"forward\"")),
            },
        ),
        case: c.parsed(
            &path.key("path_case"),
            s.path_case.as_deref(),
            defaults.case,
            |word| match word {
                "insensitive" => Ok(PathCase::Insensitive),
                "sensitive" => Ok(PathCase::Sensitive),
                other => Err(format!("{other:?}: use \"insensitive\" or \"sensitive\"")),
            },
        ),
    }
}

/// Settlements the outbox holds unless told otherwise.
const DEFAULT_PENDING_SETTLEMENTS: usize = 100_000;

/// More settlements waiting than this is a typo: at about 200 bytes each,
/// it is a gigabyte of memory.
const MAX_PENDING_SETTLEMENTS: i64 = 5_000_000;

fn pending_bound(c: &mut Checker<'_>, path: &KeyPath, raw: Option<i64>) -> usize {
    match raw {
        None => DEFAULT_PENDING_SETTLEMENTS,
        Some(n) if (1..=MAX_PENDING_SETTLEMENTS).contains(&n) => n as usize,
        Some(n) => {
            c.problem(
                path,
                format!("must be between 1 and {MAX_PENDING_SETTLEMENTS} (got {n})"),
            );
            DEFAULT_PENDING_SETTLEMENTS
        }
    }
}

fn validate_identity(c: &mut Checker<'_>, raw: &RawConfig) -> Vec<IdentitySource> {
    let path = KeyPath::default().key("identity");
    let id = &raw.identity;
    let declared: Vec<String> = match &id.sources {
        Some(sources) => sources.clone(),
        // Without a list, every configured source is tried in the reference order.
        None => [
            ("api_key", id.api_key.is_some()),
            ("jwt", id.jwt.is_some()),
            ("header", id.header.is_some()),
        ]
        .into_iter()
        .filter(|&(_, configured)| configured)
        .map(|(name, _)| name.to_string())
        .collect(),
    };
    let mut seen = HashSet::new();
    let mut sources = Vec::new();
    for (i, name) in declared.iter().enumerate() {
        let at = path.key("sources").index(i);
        if !seen.insert(name.as_str()) {
            c.problem(&at, format!("{name:?} is listed twice"));
            continue;
        }
        match name.as_str() {
            "api_key" => {
                let Some(keys) = &id.api_key else {
                    c.problem(
                        &at,
                        "\"api_key\" is listed but [identity.api_key] is missing",
                    );
                    continue;
                };
                let section = path.key("api_key");
                let header = header_name(
                    c,
                    &section.key("header"),
                    keys.header.as_deref().unwrap_or("authorization"),
                );
                let mut names = HashSet::new();
                let mut digests = HashSet::new();
                let mut parsed = Vec::new();
                for (k, key) in keys.keys.iter().enumerate() {
                    let at = section.key("keys").index(k);
                    let digest = c.text(&at.key("sha256"), &key.sha256).and_then(|text| {
                        let mut digest = [0u8; 32];
                        match hex::decode_to_slice(text.trim(), &mut digest) {
                            Ok(()) => Some(digest),
                            Err(_) => {
                                c.problem(
                                    &at.key("sha256"),
                                    "must be the 64 hex digits of the key's sha256",
                                );
                                None
                            }
                        }
                    });
                    if let Some(digest) = digest
                        && !digests.insert(digest)
                    {
                        c.problem(&at.key("sha256"), "this key digest is listed twice");
                    }
                    let org = c.org_id(&at.key("org"), &key.org);
                    let name = key.name.clone().unwrap_or_else(|| format!("key-{k}"));
                    if !names.insert(name.clone()) {
                        c.problem(
                            &at.key("name"),
                            format!("the key name {name:?} is used twice"),
                        );
                    }
                    if let (Some(sha256), Some(org)) = (digest, org) {
                        parsed.push(ApiKey { sha256, org, name });
                    }
                }
                sources.push(IdentitySource::ApiKey(ApiKeys {
                    header,
                    keys: parsed,
                }));
            }
            "header" => {
                let Some(header) = &id.header else {
                    c.problem(&at, "\"header\" is listed but [identity.header] is missing");
                    continue;
                };
                let section = path.key("header");
                let name = header_name(
                    c,
                    &section.key("name"),
                    header.name.as_deref().unwrap_or("x-org-id"),
                );
                let trusted_peers = trusted_peers(
                    c,
                    &section.key("trusted_peers"),
                    header.trusted_peers.as_deref(),
                );
                sources.push(IdentitySource::Header(HeaderSource {
                    name,
                    trusted_peers,
                }));
            }
            "jwt" => {
                let Some(jwt) = &id.jwt else {
                    c.problem(&at, "\"jwt\" is listed but [identity.jwt] is missing");
                    continue;
                };
                if let Some(config) = validate_jwt(c, &path.key("jwt"), jwt) {
                    sources.push(IdentitySource::Jwt(Arc::new(config)));
                }
            }
            other => c.problem(
                &at,
                format!(
                    "{other:?} is not an identity source: use \"api_key\", \"jwt\" or \"header\""
                ),
            ),
        }
    }
    sources
}

/// The peers an org header is believed from. Required: without it, any
/// client could name the org that pays.
fn trusted_peers(c: &mut Checker<'_>, path: &KeyPath, raw: Option<&[String]>) -> Vec<IpNet> {
    let Some(raw) = raw else {
        c.problem(
            path,
            "missing: list the auth layer's addresses, e.g. [\"10.0.0.0/8\"]; the header is believed only from these peers",
        );
        return Vec::new();
    };
    if raw.is_empty() {
        c.problem(
            path,
            "lists no peer, so the header would never be believed: list the auth layer's addresses or drop the header source",
        );
    }
    raw.iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            c.parsed(&path.index(i), Some(entry), None, |text| {
                peer_net(text).map(Some)
            })
        })
        .collect()
}

/// A CIDR, or a bare IP meaning that address alone (/32 or /128).
fn peer_net(text: &str) -> Result<IpNet, String> {
    match text.parse::<IpNet>() {
        Ok(net) => Ok(net.trunc()),
        Err(_) => text
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{text:?} is not an IP address or a CIDR such as \"10.0.0.0/8\"")),
    }
}

fn redis_target(
    c: &mut Checker<'_>,
    path: &KeyPath,
    url: Option<&str>,
    cluster: Option<&[String]>,
) -> Option<RedisTarget> {
    let checked_url = |c: &mut Checker<'_>, path: &KeyPath, raw: &str| {
        let url = c.text(path, raw)?;
        match redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
            Ok(_) => Some(url),
            // The URL may hold a password: the message names the key, not the value.
            Err(e) => {
                c.problem(
                    path,
                    format!(
                        "not a Redis URL such as \"redis://127.0.0.1:6379\" ({:?})",
                        e.kind()
                    ),
                );
                None
            }
        }
    };
    match (url, cluster) {
        (Some(url), None) => checked_url(c, &path.key("url"), url).map(RedisTarget::Single),
        (None, Some(nodes)) if !nodes.is_empty() => {
            let checked: Vec<Option<String>> = nodes
                .iter()
                .enumerate()
                .map(|(i, node)| checked_url(c, &path.key("cluster").index(i), node))
                .collect();
            checked
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .map(RedisTarget::Cluster)
        }
        (Some(_), Some(_)) => {
            c.problem(
                &path.key("cluster"),
                "set `url` (one Redis) or `cluster` (its nodes), not both",
            );
            None
        }
        (None, _) => {
            c.problem(
                &path.key("url"),
                "backend = \"redis\" needs `url` or a non-empty `cluster`",
            );
            None
        }
    }
}

fn validate_jwt(c: &mut Checker<'_>, path: &KeyPath, raw: &RawJwt) -> Option<JwtConfig> {
    let accepted = [
        "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384",
    ];
    let mut algorithms = Vec::new();
    for (i, name) in raw
        .algorithms
        .clone()
        .unwrap_or_else(|| vec!["HS256".into()])
        .iter()
        .enumerate()
    {
        match Algorithm::from_str(name)
            .ok()
            .filter(|_| accepted.contains(&name.as_str()))
        {
            Some(algorithm) => algorithms.push(algorithm),
            None => c.problem(
                &path.key("algorithms").index(i),
                format!("{name:?} is not one of {}", accepted.join(", ")),
            ),
        }
    }
    let wants = |family: AlgorithmFamily| algorithms.iter().any(|a| a.family() == family);
    let hmac_secret = match (&raw.secret, wants(AlgorithmFamily::Hmac)) {
        (Some(secret), true) => c.text(&path.key("secret"), secret).and_then(|secret| {
            if secret.len() < 16 {
                // The message never shows the secret itself.
                c.problem(
                    &path.key("secret"),
                    "is too short to be an HMAC secret (16 bytes at least)",
                );
                return None;
            }
            Some(Redacted(DecodingKey::from_secret(secret.as_bytes())))
        }),
        (None, true) => {
            c.problem(
                &path.key("secret"),
                "an HMAC algorithm is accepted, so a `secret` is needed",
            );
            None
        }
        (Some(_), false) => {
            c.problem(
                &path.key("secret"),
                "is only used with HS256, HS384 or HS512 in `algorithms`",
            );
            None
        }
        (None, false) => None,
    };
    let public_families = [AlgorithmFamily::Rsa, AlgorithmFamily::Ec];
    let wants_public = public_families.into_iter().any(wants);
    let public_keys = match (&raw.jwks_file, wants_public) {
        (Some(file), true) => c
            .text(&path.key("jwks_file"), file)
            .map_or_else(Vec::new, |file| {
                read_jwks(&file).unwrap_or_else(|message| {
                    c.problem(&path.key("jwks_file"), message);
                    Vec::new()
                })
            }),
        (None, true) => {
            c.problem(
                &path.key("jwks_file"),
                "an RS or ES algorithm is accepted, so a `jwks_file` is needed",
            );
            Vec::new()
        }
        (Some(_), false) => {
            c.problem(
                &path.key("jwks_file"),
                "is only used with RS or ES algorithms in `algorithms`",
            );
            Vec::new()
        }
        (None, false) => Vec::new(),
    };
    let org_claim: Vec<String> = match raw.org_claim.as_deref() {
        Some(claim) if !claim.is_empty() && claim.split('.').all(|part| !part.is_empty()) => {
            claim.split('.').map(String::from).collect()
        }
        Some(claim) => {
            c.problem(
                &path.key("org_claim"),
                format!("{claim:?} is not a dotted claim path such as \"app_metadata.org_id\""),
            );
            Vec::new()
        }
        None => {
            c.problem(
                &path.key("org_claim"),
                "missing: the claim holding the org id, e.g. \"app_metadata.org_id\"",
            );
            Vec::new()
        }
    };
    let audience = raw
        .audience
        .as_deref()
        .and_then(|a| c.text(&path.key("audience"), a));
    let issuer = raw
        .issuer
        .as_deref()
        .and_then(|i| c.text(&path.key("issuer"), i));
    let leeway = c.any_duration(
        &path.key("leeway"),
        raw.leeway.as_deref(),
        Duration::from_secs(30),
        true,
    );
    (!algorithms.is_empty() && !org_claim.is_empty()).then(|| JwtConfig {
        algorithms,
        hmac_secret,
        public_keys: Redacted(public_keys),
        org_claim,
        audience,
        issuer,
        leeway,
    })
}

/// The public keys of a JWKS file, each usable with its algorithm family.
fn read_jwks(file: &str) -> Result<Vec<PublicKey>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file:?}: {e}"))?;
    let set: JwkSet =
        serde_json::from_str(&text).map_err(|e| format!("{file:?} is not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            _ => {
                return Err(format!(
                    "{file:?}: key {i} is neither an RSA nor an EC public key"
                ));
            }
        };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| format!("{file:?}: key {i} cannot be used: {e}"))?;
        keys.push(PublicKey {
            kid: jwk.common.key_id.clone(),
            family,
            key,
        });
    }
    if keys.is_empty() {
        return Err(format!("{file:?} holds no keys"));
    }
    Ok(keys)
}

/// The PEM certificates in `file`: at least one.
fn read_certificates(file: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("cannot read {file:?}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{file:?} is not PEM certificates: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("{file:?} holds no PEM certificate"));
    }
    let (_, rejected) =
        rustls::RootCertStore::empty().add_parsable_certificates(certificates.iter().cloned());
    if rejected > 0 {
        return Err(format!(
            "{file:?}: {rejected} of its certificates cannot be used as a trust anchor"
        ));
    }
    Ok(certificates)
}

/// `[server.tls]`: the certificate chain and key read and matched, and the
/// listener's rustls config built from them. Paths are read as written
/// (after `${...}` expansion), from the working directory like `jwks_file`
/// and `ca_file`.
fn validate_tls(c: &mut Checker<'_>, path: &KeyPath, raw: &RawTls) -> Option<TlsConfig> {
    let handshake_timeout = c.duration(
        &path.key("handshake_timeout"),
        raw.handshake_timeout.as_deref(),
        Duration::from_secs(10),
    );
    let (cert_at, key_at) = (path.key("cert"), path.key("key"));
    let cert = c.text(&cert_at, &raw.cert);
    let key = c.text(&key_at, &raw.key);
    let chain = cert.as_deref().and_then(|file| {
        read_chain(file)
            .map_err(|message| c.problem(&cert_at, message))
            .ok()
    });
    let key_der = key.as_deref().and_then(|file| {
        read_private_key(file)
            .map_err(|message| c.problem(&key_at, message))
            .ok()
    });
    let (chain, key_der, cert, key) = (chain?, key_der?, cert?, key?);
    match tls_server_config(chain, key_der) {
        Ok(server) => Some(TlsConfig {
            server: Redacted(Arc::new(server)),
            handshake_timeout,
        }),
        Err(rustls::Error::InvalidCertificate(error)) => {
            c.problem(
                &cert_at,
                format!("{cert:?}: its first certificate cannot be used: {error}"),
            );
            None
        }
        Err(rustls::Error::InconsistentKeys(_)) => {
            c.problem(
                &key_at,
                format!("the private key in {key:?} does not match the certificate in {cert:?}"),
            );
            None
        }
        Err(error) => {
            c.problem(&key_at, format!("{key:?} cannot be used: {error}"));
            None
        }
    }
}

/// The listener's rustls config: TLS 1.3 and 1.2 alone, and ring's default
/// cipher suites, which are all AEAD with forward secrecy (TLS 1.3's three;
/// TLS 1.2's ECDHE with AES-GCM or ChaCha20-Poly1305): no CBC, RC4, 3DES,
/// export, NULL or static-RSA suite is offered. ALPN offers h2 first.
pub(super) fn tls_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The PEM certificate chain in `file`, the server's own first.
fn read_chain(file: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(file)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|e| match e {
            rustls_pki_types::pem::Error::Io(e) => format!("cannot read {file:?}: {e}"),
            e => format!("{file:?} is not PEM certificates: {e}"),
        })?;
    if chain.is_empty() {
        return Err(format!("{file:?} holds no PEM certificate"));
    }
    Ok(chain)
}

/// The one PEM private key in `file` (PKCS#8, PKCS#1 or SEC1).
fn read_private_key(file: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(file).map_err(|e| match e {
        rustls_pki_types::pem::Error::Io(e) => format!("cannot read {file:?}: {e}"),
        rustls_pki_types::pem::Error::NoItemsFound => {
            format!("{file:?} holds no PEM private key")
        }
        e => format!("{file:?} is not a PEM private key: {e}"),
    })
}

fn header_name(c: &mut Checker<'_>, path: &KeyPath, raw: &str) -> HeaderName {
    c.parsed(
        path,
        Some(raw),
        HeaderName::from_static("invalid"),
        |text| HeaderName::from_str(text).map_err(|_| format!("{text:?} is not a header name")),
    )
}

fn validate_upstreams(
    c: &mut Checker<'_>,
    raw: &BTreeMap<String, RawUpstream>,
) -> (Vec<Upstream>, HashMap<String, Option<usize>>) {
    let mut upstreams = Vec::new();
    let mut index = HashMap::new();
    for (name, upstream) in raw {
        let path = KeyPath::default().key("upstreams").key(name);
        let url = c.text(&path.key("url"), &upstream.url).and_then(|text| {
            // Messages never echo the URL: after ${...} expansion it may hold a secret.
            let parsed = Uri::from_str(&text)
                .ok()
                .filter(|u| u.authority().is_some());
            let problem = match parsed.as_ref() {
                None => Some("not a URL such as \"http://127.0.0.1:3001\""),
                Some(u) if u.query().is_some() => Some("a query string is not allowed here"),
                Some(u) if u.authority().is_some_and(|a| a.as_str().contains('@')) => {
                    Some("credentials in the URL are not sent; use `headers` instead")
                }
                Some(u) if matches!(u.scheme_str(), Some("http" | "https")) => None,
                Some(_) => Some("the scheme must be http:// or https://"),
            };
            match problem {
                Some(message) => {
                    c.problem(&path.key("url"), message);
                    None
                }
                None => parsed,
            }
        });
        let mut headers = Vec::new();
        for (header, value) in &upstream.headers {
            let at = path.key("headers").key(header);
            let name = HeaderName::from_str(header)
                .map_err(|_| c.problem(&at, format!("{header:?} is not a header name")));
            let value = c.text(&at, value).and_then(|text| {
                let mut value = HeaderValue::from_str(&text)
                    .map_err(|_| {
                        c.problem(
                            &at,
                            "the value (after ${...} expansion) is not a valid header value",
                        )
                    })
                    .ok()?;
                value.set_sensitive(true);
                Some(value)
            });
            if let (Ok(name), Some(value)) = (name, value) {
                headers.push((name, value));
            }
        }
        let extra_roots = match &upstream.ca_file {
            None => Vec::new(),
            Some(_)
                if url
                    .as_ref()
                    .is_some_and(|u| u.scheme_str() != Some("https")) =>
            {
                c.problem(&path.key("ca_file"), "is for https:// upstreams");
                Vec::new()
            }
            Some(file) => c
                .text(&path.key("ca_file"), file)
                .map_or_else(Vec::new, |file| {
                    read_certificates(&file).unwrap_or_else(|message| {
                        c.problem(&path.key("ca_file"), message);
                        Vec::new()
                    })
                }),
        };
        let Some(url) = url else {
            // Known, so routes naming it are not reported a second time.
            index.insert(name.clone(), None);
            continue;
        };
        let mut parts = url.into_parts();
        let path_prefix = parts
            .path_and_query
            .take()
            .map(|p| p.path().trim_end_matches('/').to_string())
            .unwrap_or_default();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let Ok(origin) = Uri::from_parts(parts) else {
            index.insert(name.clone(), None);
            continue;
        };
        index.insert(name.clone(), Some(upstreams.len()));
        upstreams.push(Upstream {
            name: name.clone(),
            origin,
            path_prefix,
            headers,
            extra_roots,
        });
    }
    (upstreams, index)
}

fn validate_routes(
    c: &mut Checker<'_>,
    raw: &[RawRoute],
    upstreams: &HashMap<String, Option<usize>>,
) -> Vec<Route> {
    let mut names = HashSet::new();
    let mut routes = Vec::new();
    let mut matchable = Vec::new();
    for (i, route) in raw.iter().enumerate() {
        let path = KeyPath::default().key("routes").index(i);
        if route.name.is_empty() {
            c.problem(&path.key("name"), "a route needs a name");
        } else if !names.insert(route.name.as_str()) {
            c.problem(
                &path.key("name"),
                format!("the route name {:?} is used twice", route.name),
            );
        }
        let method = route.method.as_deref().and_then(|m| {
            Method::from_str(&m.to_ascii_uppercase())
                .map_err(|_| c.problem(&path.key("method"), format!("{m:?} is not an HTTP method")))
                .ok()
        });
        match crate::route::check_pattern(&route.path) {
            Err(message) => c.problem(&path.key("path"), message),
            // A route whose method is unreadable is left out: unset would mean any.
            Ok(()) if method.is_some() || route.method.is_none() => {
                matchable.push((i, route, method.clone()))
            }
            Ok(()) => {}
        }
        let known = upstreams.get(&route.upstream).copied();
        let upstream = known.flatten();
        if known.is_none() {
            c.problem(
                &path.key("upstream"),
                format!(
                    "no upstream is named {:?} under [upstreams]",
                    route.upstream
                ),
            );
        }
        let cost = route.cost.as_ref().map(|raw| {
            let mut cost = Cost {
                fixed: Amounts::ZERO,
                estimate_tokens: false,
            };
            for (name, amount) in raw {
                let at = path.key("cost").key(name);
                let Some(dimension) = Dimension::parse(name) else {
                    c.problem(&at, unknown_dimension(name));
                    continue;
                };
                match amount {
                    RawAmount::Word(w) if w == "estimate" && dimension == Dimension::Tokens => {
                        cost.estimate_tokens = true
                    }
                    RawAmount::Word(w) => c.problem(
                        &at,
                        format!("{w:?}: use a whole number, or \"estimate\" for tokens"),
                    ),
                    RawAmount::Fixed(n) if *n < 0 && !dimension.is_gauge() => c.problem(
                        &at,
                        format!("only seats can be released (negative); {name} = {n}"),
                    ),
                    RawAmount::Fixed(n) if n.abs() > MAX_AMOUNT => c.problem(
                        &at,
                        format!("{n} is beyond the largest amount, {MAX_AMOUNT}"),
                    ),
                    RawAmount::Fixed(n) => cost.fixed.set(dimension, *n),
                }
            }
            if raw.is_empty() || (cost.fixed.is_zero() && !cost.estimate_tokens) {
                c.problem(
                    &path.key("cost"),
                    "a cost must charge something; omit `cost` for an unmetered route",
                );
            }
            cost
        });
        if cost.is_none() {
            for (key, set) in [
                ("default_max_tokens", route.default_max_tokens.is_some()),
                ("on_error", route.on_error.is_some()),
                ("refund_statuses", route.refund_statuses.is_some()),
            ] {
                if set {
                    c.problem(
                        &path.key(key),
                        "only means something on a metered route (one with a `cost`)",
                    );
                }
            }
        }
        let estimating = cost.is_some_and(|cost| cost.estimate_tokens);
        let (estimate, completion_bound) = estimate_settings(c, &path, route, estimating);
        let on_store_error = c.on_store_error(&path.key("on_error"), route.on_error.as_deref());
        let refund_statuses = route.refund_statuses.as_ref().map(|codes| {
            codes
                .iter()
                .enumerate()
                .filter_map(|(i, &code)| {
                    let status = u16::try_from(code)
                        .ok()
                        .and_then(|c| http::StatusCode::from_u16(c).ok());
                    if status.is_none() {
                        c.problem(
                            &path.key("refund_statuses").index(i),
                            format!("{code} is not an HTTP status"),
                        );
                    }
                    status
                })
                .collect()
        });
        if let Some(upstream) = upstream {
            routes.push(Route {
                name: route.name.as_str().into(),
                method,
                path: route.path.clone(),
                upstream,
                cost,
                estimate,
                completion_bound,
                on_store_error,
                refund_statuses,
                metrics: Default::default(),
            });
        }
    }
    report_unreachable(c, &matchable);
    routes
}

/// An estimate route's pricing keys; on any other route they are errors.
fn estimate_settings(
    c: &mut Checker<'_>,
    path: &KeyPath,
    route: &RawRoute,
    estimating: bool,
) -> (EstimateRules, CompletionBound) {
    if !estimating {
        for (key, set) in [
            ("image_tokens", route.image_tokens.is_some()),
            ("completion_bound", route.completion_bound.is_some()),
            (
                "min_completion_tokens",
                route.min_completion_tokens.is_some(),
            ),
        ] {
            if set {
                c.problem(
                    &path.key(key),
                    "only means something on an estimate route (cost = { tokens = \"estimate\" })",
                );
            }
        }
    }
    let mut positive = |key: &str, raw: Option<i64>, default: i64| match raw {
        None => default,
        Some(n) if (1..=MAX_AMOUNT).contains(&n) => n,
        Some(n) => {
            c.problem(
                &path.key(key),
                format!("must be a whole number from 1 to {MAX_AMOUNT} (got {n})"),
            );
            default
        }
    };
    let rules = EstimateRules {
        default_max_tokens: positive(
            "default_max_tokens",
            route.default_max_tokens,
            DEFAULT_MAX_TOKENS,
        ),
        image_tokens: positive("image_tokens", route.image_tokens, DEFAULT_IMAGE_TOKENS),
    };
    let min_completion_tokens = positive(
        "min_completion_tokens",
        route.min_completion_tokens,
        DEFAULT_MIN_COMPLETION_TOKENS,
    );
    let bound = c.parsed(
        &path.key("completion_bound"),
        route.completion_bound.as_deref(),
        CompletionBound::AsSent,
        |word| match word {
            "as_sent" => Ok(CompletionBound::AsSent),
            "inject" => Ok(CompletionBound::Inject),
            "fit" => Ok(CompletionBound::Fit {
                min_completion_tokens,
            }),
            other => Err(format!("{other:?}: use \"as_sent\", \"inject\" or \"fit\"")),
        },
    );
    // `min_completion_tokens` is read by "fit" alone; it may stand beside
    // another bound, ready for a switch to "fit", as in the reference.
    (rules, bound)
}

/// Reports each route that an earlier route takes every request from.
fn report_unreachable(c: &mut Checker<'_>, routes: &[(usize, &RawRoute, Option<Method>)]) {
    for (at, (index, later, later_method)) in routes.iter().enumerate() {
        let earlier = routes[..at].iter().find(|(_, earlier, earlier_method)| {
            crate::route::shadows(
                (earlier_method.as_ref(), &earlier.path),
                (later_method.as_ref(), &later.path),
            )
        });
        if let Some((earlier_index, earlier, _)) = earlier {
            c.problem(
                &KeyPath::default().key("routes").index(*index).key("path"),
                format!(
                    "route {:?} can never match: route {:?} (routes[{earlier_index}]) comes first and takes every request it could",
                    later.name, earlier.name
                ),
            );
        }
    }
}

fn validate_admin(c: &mut Checker<'_>, raw: &RawAdmin) -> AdminConfig {
    let path = KeyPath::default().key("admin");
    let listen = match raw.listen.as_deref() {
        Some(text) => c.parsed(&path.key("listen"), Some(text), None, |text| {
            text.parse()
                .map(Some)
                .map_err(|_| format!("{text:?} is not an address: write e.g. \"127.0.0.1:9090\""))
        }),
        None => {
            c.problem(&path.key("listen"), "missing: the admin listener's address");
            None
        }
    }
    .unwrap_or_else(|| ([127, 0, 0, 1], 9090).into());
    if raw.tokens.is_empty() {
        c.problem(
            &path.key("tokens"),
            "name at least one token: everything under /v1/ needs one",
        );
    }
    let mut tokens = Vec::new();
    let mut seen = HashSet::new();
    for (i, token) in raw.tokens.iter().enumerate() {
        let at = path.key("tokens").index(i);
        let name = token.name.clone().unwrap_or_else(|| format!("token-{i}"));
        let Some(sha256) = c.sha256(&at.key("sha256"), &token.sha256, "token") else {
            continue;
        };
        if !seen.insert(sha256) {
            c.problem(&at.key("sha256"), "this token digest is listed twice");
        }
        tokens.push(AdminToken {
            sha256: Redacted(sha256),
            name,
        });
    }
    AdminConfig { listen, tokens }
}

/// The shortest `[usage_page] secret`: an HMAC key shorter than its hash
/// is easier to guess than the tag it makes.
const MIN_LINK_SECRET_BYTES: usize = 32;

fn validate_usage_page(
    c: &mut Checker<'_>,
    raw: &RawUsagePage,
    routes: &[RawRoute],
) -> Option<UsagePageConfig> {
    let at = KeyPath::default().key("usage_page");
    let path = match raw.path.as_deref() {
        None => {
            c.problem(
                &at.key("path"),
                "missing: where the page is served, e.g. \"/_tollgate/usage\"",
            );
            None
        }
        Some(path) if !path.starts_with('/') || path.contains(['?', '#', ' ']) => {
            c.problem(
                &at.key("path"),
                format!("{path:?} must be a path starting with '/', without '?', '#' or spaces"),
            );
            None
        }
        Some(path) => {
            match routes
                .iter()
                .position(|route| route_matches(&route.path, path))
            {
                Some(i) => {
                    c.problem(&at.key("path"), format!(
                        "{path:?} is also matched by routes[{i}] ({:?}); pick a path no route serves",
                        routes[i].name
                    ));
                    None
                }
                None => Some(path.to_string()),
            }
        }
    };
    let secret = match raw.secret.as_deref() {
        None => {
            c.problem(&at.key("secret"), "missing: the links are signed with it");
            None
        }
        Some(raw) => c.text(&at.key("secret"), raw).and_then(|secret| {
            if secret.len() < MIN_LINK_SECRET_BYTES {
                c.problem(&at.key("secret"), format!(
                    "must be at least {MIN_LINK_SECRET_BYTES} bytes (got {}); e.g. `openssl rand -hex 32`",
                    secret.len()
                ));
                None
            } else {
                Some(SigningKey::new(secret.as_bytes()))
            }
        }),
    };
    let upgrade_url = raw.upgrade_url.as_deref().and_then(|raw| {
        let text = c.text(&at.key("upgrade_url"), raw)?;
        let web = Uri::from_str(&text).ok().filter(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
        });
        if web.is_none() {
            c.problem(
                &at.key("upgrade_url"),
                format!("{text:?} is not an http or https URL"),
            );
        }
        web.map(|_| text)
    });
    Some(UsagePageConfig {
        path: path?,
        secret: secret?,
        upgrade_url,
    })
}

/// Whether a route's path pattern matches `path` (a pattern already
/// reported as invalid matches nothing). A catch-all (`{*rest}`) does not
/// count: it is meant for whatever no one else serves, and the page, looked
/// at before routing, takes its one path from it, as the reference config
/// (`/{*rest}` beside `/_tollgate/usage`) expects.
fn route_matches(pattern: &str, path: &str) -> bool {
    if pattern.contains("{*") {
        return false;
    }
    let mut router = matchit::Router::new();
    router.insert(pattern, ()).is_ok() && router.at(path).is_ok()
}

fn validate_orgs(c: &mut Checker<'_>, raw: &RawConfig, mode: Mode) -> OrgDirectory {
    let mut plans = HashMap::new();
    for (slug, limits) in &raw.plans {
        let limits = c.limits(&KeyPath::default().key("plans").key(slug), limits);
        plans.insert(slug.as_str(), limits);
    }
    let plan = |c: &mut Checker<'_>, path: &KeyPath, slug: &str| match plans.get(slug) {
        Some(limits) => Some((Arc::<str>::from(slug), *limits)),
        None => {
            c.problem(path, format!("no plan is named {slug:?} under [plans]"));
            None
        }
    };

    let defaults = KeyPath::default().key("defaults");
    let (default_plan, default_limits) = match raw.defaults.plan.as_deref() {
        Some(slug) => plan(c, &defaults.key("plan"), slug),
        // With no plans at all there is nothing to enforce yet; with some, an
        // unlisted org's plan must be chosen, not guessed.
        None if raw.plans.is_empty() => Some(("unlimited".into(), Limits::UNLIMITED)),
        None => {
            c.problem(
                &defaults.key("plan"),
                "missing: name the plan for orgs not listed under [orgs]",
            );
            None
        }
    }
    .unwrap_or(("unlimited".into(), Limits::UNLIMITED));
    let default = Arc::new(OrgPolicy {
        plan: default_plan,
        billing_status: raw
            .defaults
            .billing_status
            .as_deref()
            .unwrap_or("active")
            .into(),
        period_anchor_day: c.anchor_day(
            &defaults.key("period_anchor_day"),
            raw.defaults.period_anchor_day,
            1,
        ),
        mode,
        limits: default_limits,
    });

    let mut known = KnownOrgs::default();
    for (id, org) in &raw.orgs {
        let path = KeyPath::default().key("orgs").key(id);
        let org_id = c.org_id(&path, id);
        let (plan_slug, plan_limits) = match org.plan.as_deref() {
            Some(slug) => {
                plan(c, &path.key("plan"), slug).unwrap_or((default.plan.clone(), default.limits))
            }
            None => (default.plan.clone(), default.limits),
        };
        let overrides = c.limits(&path.key("limits"), &org.limits);
        let policy = OrgPolicy {
            plan: plan_slug,
            billing_status: org
                .billing_status
                .as_deref()
                .map_or_else(|| default.billing_status.clone(), Arc::from),
            period_anchor_day: c.anchor_day(
                &path.key("period_anchor_day"),
                org.period_anchor_day,
                default.period_anchor_day,
            ),
            mode: c.mode(&path.key("enforcement"), org.enforcement.as_deref(), mode),
            limits: plan_limits.overridden_by(&overrides),
        };
        if let Some(org_id) = org_id {
            known.insert(org_id, Arc::new(policy));
        }
    }
    let plans = plans
        .into_iter()
        .map(|(slug, limits)| (Arc::from(slug), limits))
        .collect();
    OrgDirectory {
        known,
        default,
        plans,
    }
}
