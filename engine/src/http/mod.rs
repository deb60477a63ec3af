//! HTTP: the API (Corrosion-compatible v1) and the admin routes ([`api`]), serving a router on
//! a listener ([`serve`]), the request and answer shapes shared by server, CLI and tests
//! ([`types`]), and the CLI's small client ([`client`]).

pub mod api;
pub mod client;
pub mod serve;
pub mod types;
