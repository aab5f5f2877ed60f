//! The ipcbus endpoint manager (EPM): a daemon that keeps `handle -> receivers`
//! registrations for a host or a LAN, leased and bound to the connection that made
//! them, and pushes changes to watchers.
//!
//! Modules:
//! - [`config`]: command line (including the classic `epm-service [PORT] [PASSWORD
//!   SALT]` form), environment and TOML file, merged into a [`Config`].
//! - [`registry`]: the I/O-free state: registrations, leases, watchers, limits. It
//!   takes the time as an argument and returns the notices to deliver.
//! - [`server`]: the async driver: listeners, one task per connection, the lease
//!   sweeper, graceful shutdown. Entry point [`run`].
//! - [`store`]: `--store etcd://...`: this EPM's registrations put in etcd, and
//!   everyone's learned from etcd's watch, so several EPMs serve one view.
//! - [`monitor`]: the counters and the I/O-free renderings of the service's state
//!   for the HTTP endpoint: `/status` JSON, `/metrics` text, the `/` page.
//! - [`http`]: the minimal HTTP/1.1 server of `--http` (GET only, bounded).
//! - [`cli`]: what `main` does: parse, log to stderr, bind, run until SIGTERM/SIGINT.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod cli;
pub mod config;
pub mod http;
pub mod monitor;
pub mod registry;
pub mod server;
pub mod store;

pub use config::{Args, Config, ConfigError, HttpConfig, Limits, Store};
pub use registry::Registry;
pub use server::{bind_all, run, run_with_http, serve_with_store};
pub use store::EtcdStore;
