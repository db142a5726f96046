//! The TOML file as written: every key of the reference interface, nothing
//! interpreted yet. Unknown keys are still errors, so a typo never silently
//! falls back to a default, but serde ignores them here and the loader
//! collects them, to report them along with every other problem.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub enforcement: RawEnforcement,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub plans: BTreeMap<String, BTreeMap<String, i64>>,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub orgs: BTreeMap<String, RawOrg>,
    pub admin: Option<RawAdmin>,
    pub usage_page: Option<RawUsagePage>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    pub listen: Option<String>,
    pub max_body_bytes: Option<i64>,
    pub upstream_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub ambiguous_paths: Option<String>,
    pub path_case: Option<String>,
    pub workers: Option<i64>,
    pub max_connections: Option<i64>,
    pub keepalive_timeout: Option<String>,
    pub access_log: Option<bool>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
    pub handshake_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawStore {
    pub backend: Option<String>,
    pub url: Option<String>,
    pub cluster: Option<Vec<String>>,
    pub key_prefix: Option<String>,
    pub timeout: Option<String>,
    pub on_error: Option<String>,
    pub settle_retry_for: Option<String>,
    pub max_pending_settlements: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawEnforcement {
    pub mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawIdentity {
    pub sources: Option<Vec<String>>,
    pub api_key: Option<RawApiKeys>,
    pub jwt: Option<RawJwt>,
    pub header: Option<RawHeaderSource>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawApiKeys {
    pub header: Option<String>,
    #[serde(default)]
    pub keys: Vec<RawApiKey>,
}

#[derive(Debug, Deserialize)]
pub struct RawApiKey {
    pub sha256: String,
    pub org: String,
    pub name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawJwt {
    pub algorithms: Option<Vec<String>>,
    pub secret: Option<String>,
    pub jwks_file: Option<String>,
    pub org_claim: Option<String>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawHeaderSource {
    pub name: Option<String>,
    pub trusted_peers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct RawUpstream {
    pub url: String,
    pub ca_file: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
pub struct RawRoute {
    pub name: String,
    pub method: Option<String>,
    pub path: String,
    pub upstream: String,
    pub cost: Option<BTreeMap<String, RawAmount>>,
    pub default_max_tokens: Option<i64>,
    pub image_tokens: Option<i64>,
    pub completion_bound: Option<String>,
    pub min_completion_tokens: Option<i64>,
    pub on_error: Option<String>,
    pub refund_statuses: Option<Vec<i64>>,
}

/// A cost entry: a fixed amount, or a word (`"estimate"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawAmount {
    Fixed(i64),
    Word(String),
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDefaults {
    pub plan: Option<String>,
    pub billing_status: Option<String>,
    pub period_anchor_day: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct RawOrg {
    pub plan: Option<String>,
    pub billing_status: Option<String>,
    pub period_anchor_day: Option<i64>,
    pub enforcement: Option<String>,
    #[serde(default)]
    pub limits: BTreeMap<String, i64>,
}

#[derive(Debug, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<String>,
    #[serde(default)]
    pub tokens: Vec<RawAdminToken>,
}

#[derive(Debug, Deserialize)]
pub struct RawAdminToken {
    pub sha256: String,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawUsagePage {
    pub path: Option<String>,
    pub secret: Option<String>,
    pub upgrade_url: Option<String>,
}
