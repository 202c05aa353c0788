//! taskd: a task management REST API that is also its own load balancer and supervisor.
//!
//! # Layout
//!
//! - [`worker`]: the API process (`taskd worker`): axum handlers, PostgreSQL stores, Redis.
//! - [`proxy`]: the load balancer (`taskd proxy`): hyper server and pooled upstream connections.
//! - [`supervisor`]: the local cluster (`taskd serve`): worker processes behind the proxy,
//!   probed, restarted and rolled.
//! - [`config`], [`telemetry`], [`shutdown`], [`db`], [`health`], [`compression`]: the shared base
//!   every role stands on.
//! - [`cli`]: the command line, dispatching to the roles.
//! - [`seed`]: realistic bulk data for benchmarks and demos (`taskd seed`).

pub mod cli;
pub mod compression;
pub mod config;
pub mod db;
pub(crate) mod health;
pub mod proxy;
pub(crate) mod seed;
pub(crate) mod shutdown;
pub mod supervisor;
pub(crate) mod telemetry;
pub mod worker;
