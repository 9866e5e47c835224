//! SealDB server library: configuration, the HTTP API, the key hierarchy and the engine.
//! The binary (`main.rs`) only parses flags and calls [`app::run`].

pub mod engine;
pub mod keys;
