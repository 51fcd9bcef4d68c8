//! fencegate: an HTTP reverse proxy that enforces fencing tokens in front of storage that does not.
//!
//! # Layout
//!
//! - [`token`]: the `Fencing-Token` header, parsed once into a [`token::FencingToken`].
//! - [`route`]: path normalisation, route matching and the resource a request is fenced under.
//! - [`gate`]: per-resource ordering; the only place that decides whether a request is forwarded.
//! - [`store`]: SQLite, the only module that touches it: writes through one group-commit writer
//!   thread, operators' reads through read-only connections.
//! - [`audit`]: what a rejection record holds, and how operators name a time (`since`).
//! - [`proxy`]: the data-plane service: edge checks, then gate, then upstream.
//! - [`profile`]: storage profiles, what a database's API changes (the key map and etcd's v3
//!   gateway so far; not yet taken up by routes).
//! - [`problem`]: every error fencegate answers itself, as `application/problem+json`.
//! - [`admin`]: the admin API: probes, metrics, resources, rejections, epochs, fence and reset.
//! - [`metrics`]: the Prometheus metrics the admin plane serves.
//! - [`config`]: the typed, validated configuration.
//! - [`server`]: binds both planes, serves them, shuts them down in order.
//! - [`shutdown`]: the OS signals that start a graceful shutdown.
//! - [`idle`]: the coarse clock connections' idle stamps are taken on.
//! - [`header_maps`]: header maps kept for reuse by the thread that is done with them.
//! - `ascii`: header names and the protocol's words compared in any case, a word at a time.
//! - [`telemetry`]: tracing set-up.
//! - [`cli`]: the command line: `serve`, `audit`, `epochs`, `fence`, `check-config`.

pub mod admin;
mod ascii;
pub mod audit;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod gate;
pub mod header_maps;
pub mod idle;
pub mod metrics;
pub mod problem;
pub mod profile;
pub mod proxy;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod verbatim;
