//! End-to-end tests: the real gateway on a free port in front of a real HTTP
//! stand-in upstream.

mod admin;
mod admin_catalog;
mod browser;
mod cli;
mod connections;
mod enforcement;
mod errors;
mod forwarding;
mod identity;
mod jwt;
mod llm;
mod llm_bounds;
mod metrics;
mod paths;
mod ratelimit_headers;
mod redis_gateway;
mod reload;
mod runtime_orgs;
mod store_conformance;
mod store_outage;
mod support;
mod tls;
mod usage_page;
