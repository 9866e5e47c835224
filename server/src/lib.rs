//! SealDB server library: configuration, the HTTP API, auth, the key hierarchy and the
//! engine. The binary (`main.rs`) only parses flags and calls [`app::run`].

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod embed;
pub mod engine;
pub mod keys;
pub mod kms;
pub mod limits;
pub mod metrics;
pub mod plugins;
pub mod tls;
pub mod users;

#[cfg(test)]
mod fuzz;
