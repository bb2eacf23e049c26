//! The Outpost coordinator: the Remote Execution API v2 server that owns the
//! CAS and the Action Cache (and, as the fleet work lands, the queue and the
//! agents' streams).
//!
//! It is not a client and runs no actions itself. Start at [`Coordinator`]:
//! [`Coordinator::bind`] opens storage and the listening socket,
//! [`Coordinator::serve`] runs until the shutdown token fires, then flushes
//! storage. [`service`] holds the gRPC services, [`storage`] the CAS and
//! Action Cache behind traits, [`config`] the configuration.

pub mod config;
mod server;
pub mod service;
pub mod storage;

pub use config::Config;
pub use server::Coordinator;
