//! The Outpost coordinator: the Remote Execution API v2 server that owns the
//! CAS, the Action Cache, the queue and the agents' streams.
//!
//! It is not a client and runs no actions itself: agents dial in
//! ([`fleet`]) and the [`scheduler`] leases them work that [`execution`]
//! accepted. Start at [`Coordinator`]:
//! [`Coordinator::bind`] opens storage and the listening socket,
//! [`Coordinator::serve`] runs until the shutdown token fires, then flushes
//! storage. [`service`] holds the cache's gRPC services, [`storage`] the CAS and
//! Action Cache behind traits, [`config`] the configuration, [`auth`] tokens and
//! roles, [`tls`] the server's certificates.

pub mod auth;
pub mod config;
pub mod execution;
mod fleet;
pub mod fuzzing;
pub mod metrics;
pub mod scheduler;
mod server;
pub mod service;
mod status;
pub mod storage;
pub mod tls;

pub use config::Config;
pub use server::Coordinator;
